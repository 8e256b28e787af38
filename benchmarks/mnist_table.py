"""Regenerate the data-free MNIST table (LeNet-5 -> LeNet-5-half: ZSKD, Class Impressions, Wang 2021, the online
baseline) with one command.

    ZSKD_DATA_ROOT=../shared/data python benchmarks/mnist_table.py [--rows all] [--seeds 0 1 2] [--schedule fast]

Every row runs the ``zskd`` CLI on a shipped config with command-line overrides (printed in the table, so each
row can be rerun by hand), reads the final (last-epoch) test accuracy from its output, and the synthesis wall
time from the impression cache's manifest. Results accumulate in ``benchmarks/results/mnist.csv`` (rows
already measured for the same command are skipped, so an interrupted run resumes); ``mnist.md`` and
``mnist.png`` (and, once online rows exist, ``mnist_time.png``: accuracy against wall time) are rebuilt from
the CSV after every row.

``--schedule paper`` synthesizes with the paper's procedure (uniform noise, 1500 iterations at lr 0.01, no
prior, no jitter); ``fast`` with the shipped fast config's recipe. The teacher row's seed 0 (the config's own
seed) trains the teacher every other row loads; its other seeds measure the recipe's spread and save no
checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from zskd_lightning.files import write_atomic, write_csv_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TEACHER_CONFIG = "configs/mnist/teacher_lenet5.yaml"
TEACHER_CKPT = "runs/mnist/teacher_lenet5/last.ckpt"  # written by TEACHER_CONFIG
TEACHER_SEED = 0  # TEACHER_CONFIG's seed_everything: the seed of the teacher every student loads
PAPER = {"teacher": 99.34, "student_ce": 98.92, "student_kd": 99.25, "zskd": 98.77, "lopes": 92.47}
#: Wang 2021 (AAAI), its own MNIST table: Wang 99.08, KD on real data 99.18 (its teacher is not reported here).
PAPER_WANG = 99.08
#: What the rows were trained on: part of every row's fingerprint. Rows of the 17,435-image MNIST that this
#: machine held before carry no such tag, so they are stale (and were dropped from the CSV).
DATA_TAG = "mnist-60000"
ABLATION = (600, 3000, 6000, 12000, 24000)  # 1%, 5%, 10%, 20%, 40% of MNIST's 60,000
FIELDS = ["row", "method", "impressions", "seed", "test_acc", "teacher_acc", "synthesis_s", "total_s", "hardware", "command",
          "configs_sha", "training_s"]
ROW_ORDER = ("teacher", "student_ce", "student_kd", "zskd", "zskd_paper", "zskd_bf16", "ci", "ci_paper", "wang",
             "wang_paper", "fast", "ssdkd", "ssdkd_no_phi", "ssdkd_uniform", "ssdkd_1pct", "ablation", "ablation_paper")
#: Online rows: (row, method, configs, extra arguments). SSD-KD at 10% of MNIST (a 6,000-input buffer, as the
#: baseline's), its ablations, and SSD-KD at 1% (600).
ONLINE_ROWS = (
    ("fast", "fast", ("configs/mnist/fast_lenet5_half.yaml",), ()),
    ("ssdkd", "ssd_kd", ("configs/mnist/ssdkd_lenet5_half.yaml",), ()),
    ("ssdkd_no_phi", "ssd_kd", ("configs/mnist/ssdkd_lenet5_half.yaml", "configs/mnist/ssdkd/no_phi.yaml"), ()),
    ("ssdkd_uniform", "ssd_kd", ("configs/mnist/ssdkd_lenet5_half.yaml", "configs/mnist/ssdkd/uniform.yaml"), ()),
    ("ssdkd_1pct", "ssd_kd", ("configs/mnist/ssdkd_lenet5_half.yaml",), ("--data.init_args.buffer_size", "600")),
)
#: Rows of the accuracy-against-time figure (mnist_time.png), with their legend.
TIMED_ROWS = {"zskd": "ZSKD, 24,000 impressions", "wang": "Wang 2021, 24,000 impressions",
              "fast": "online baseline (10%)", "ssdkd": "SSD-KD (10%)", "ssdkd_1pct": "SSD-KD (1%)"}
#: Online rows synthesize during distillation; their log line gives the inputs made and the synthesis time.
ONLINE_LINE = re.compile(r"Online synthesis: \d+ rounds, (\d+) inputs synthesized in ([0-9.]+) s")
TARGET_ACC = 98.5  # the time-to-accuracy goal (%), from a trained teacher to the student


def hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU x{os.cpu_count()} ({platform.machine()})"


def row_commands(rows: list[str], seeds: list[int], schedule: str) -> list[tuple[str, str, int, int, list[str]]]:
    """(row, method, impressions, seed, zskd arguments) for every requested measurement.

    Rows of the paper schedule are named ``<row>_paper`` so they never average with the fast schedule's;
    ``zskd_bf16`` is the fast ZSKD row with bf16 synthesis (the accuracy check of that speed-up).
    """
    plans = []
    paper_synthesis = {"iterations": "1500", "lr": "0.01", "init": "uniform", "regularizers": "[]",
                       "jitter": "0"}
    synth = [] if schedule == "fast" else [
        arg for key, value in paper_synthesis.items() for arg in (f"--data.init_args.synthesizer.init_args.{key}", value)
    ]
    suffix = "" if schedule == "fast" else "_paper"

    def data_free(method: str, config: str, n: int, seed: int, row: str, variant: str = "", extra: tuple[str, ...] = ()):
        name = f"{method}{variant}_{schedule}_{n}_s{seed}"
        return (row + suffix, method, n, seed, ["fit", "--config", f"configs/mnist/{config}", "--seed_everything", str(seed),
                "--data.init_args.num_impressions", str(n), "--data.init_args.seed", str(seed),
                "--data.init_args.cache_dir", f"runs/mnist/impressions/{name}",
                "--trainer.default_root_dir", f"runs/mnist/table/{name}", *synth, *extra])

    for seed in seeds:
        if "teacher" in rows and seed == TEACHER_SEED:
            plans.append(("teacher", "ce-real", 0, seed, ["fit", "--config", TEACHER_CONFIG]))
        elif "teacher" in rows:  # no checkpoint: the students' teacher stays the one of TEACHER_SEED
            plans.append(("teacher", "ce-real", 0, seed, ["fit", "--config", TEACHER_CONFIG, "--seed_everything", str(seed),
                          "--trainer.default_root_dir", f"runs/mnist/table/teacher_s{seed}", "--trainer.callbacks", "[]"]))
        if "student_ce" in rows:
            plans.append(("student_ce", "ce-real", 0, seed, ["fit", "--config", "configs/mnist/student_ce_lenet5_half.yaml",
                          "--seed_everything", str(seed), "--trainer.default_root_dir", f"runs/mnist/table/student_ce_s{seed}",
                          "--trainer.callbacks", "[]"]))
        if "student_kd" in rows:
            plans.append(("student_kd", "kd-real", 0, seed, ["fit", "--config", "configs/mnist/kd_real_lenet5_half.yaml",
                          "--seed_everything", str(seed), "--trainer.default_root_dir", f"runs/mnist/table/student_kd_s{seed}"]))
        if "zskd" in rows:
            plans.append(data_free("zskd", "zskd_lenet5_half_fast.yaml", 24000, seed, "zskd"))
        if "zskd_bf16" in rows:
            plans.append(data_free("zskd", "zskd_lenet5_half_fast.yaml", 24000, seed, "zskd_bf16", "_bf16",
                                   ("--data.init_args.synthesizer.init_args.precision", "bf16-mixed")))
        if "ci" in rows:
            plans.append(data_free("ci", "ci_lenet5_half.yaml", 24000, seed, "ci"))
        if "wang" in rows:
            plans.append(data_free("wang", "wang_lenet5_half.yaml", 24000, seed, "wang"))
        # online rows: "impressions" becomes the number of inputs the run synthesized
        for row, method, configs, extra in ONLINE_ROWS:
            if row in rows:
                plans.append((row, method, 0, seed, ["fit", *[a for c in configs for a in ("--config", c)],
                              "--seed_everything", str(seed), "--data.init_args.seed", str(seed),
                              "--trainer.default_root_dir", f"runs/mnist/table/{row}_s{seed}", *extra]))
    if "ablation" in rows:
        for n in ABLATION:
            for method, config in (("zskd", "zskd_lenet5_half_fast.yaml"), ("ci", "ci_lenet5_half.yaml")):
                # 24,000 impressions is the headline row itself: measured (and stored) once, as that row.
                plan = data_free(method, config, n, seeds[0], method if n == 24000 else "ablation")
                if plan not in plans:
                    plans.append(plan)
    return plans


def configs_sha(args: list[str]) -> str:
    """Fingerprint of what a row measures: its configs, the data (:data:`DATA_TAG`) and, for a row that loads the
    teacher, the teacher's config.

    Configs are hashed as parsed YAML, so editing a comment leaves every row current; a row measured with other
    settings (or another teacher recipe) is stale.
    """

    def parsed(path: str) -> str:
        return json.dumps(yaml.safe_load((ROOT / path).read_text()), sort_keys=True)

    # every --config counts (a variant overlay on a base); one config hashes exactly as before overlays existed
    config = "".join(parsed(args[i + 1]) for i, arg in enumerate(args) if arg == "--config")
    digest = hashlib.sha256(config.encode())
    digest.update(DATA_TAG.encode())
    if TEACHER_CKPT in config:
        digest.update(parsed(TEACHER_CONFIG).encode())
    return digest.hexdigest()[:12]


def is_current(record: dict[str, str]) -> bool:
    """Whether a CSV record was measured with today's configs (see :func:`configs_sha`)."""
    return record.get("configs_sha", "") == configs_sha(record["command"].split())


def run_row(args: list[str]) -> dict[str, float]:
    """Run ``zskd ARGS``; return test accuracies (%) and timings read from its output and cache manifest.

    Data-free rows run with ``overwrite_cache`` (not part of the row's command): a cache folder that an
    earlier measurement filled with other settings or another teacher is replaced, one of the same settings is
    resumed (an interrupted row) or reused. The synthesis time of a resumed row is this run's wall time plus
    the manifest's ``resumed_seconds`` (the chunks an earlier run finished; table rows use one process).
    """
    manifest, overwrite = None, []
    if "--data.init_args.cache_dir" in args:
        manifest = ROOT / args[args.index("--data.init_args.cache_dir") + 1] / "manifest.json"
        overwrite = ["--data.init_args.overwrite_cache", "true"]

    def manifest_text() -> str | None:
        return manifest.read_text() if manifest is not None and manifest.exists() else None

    manifest_before = manifest_text()
    started = time.perf_counter()
    command = [sys.executable, "-m", "zskd_lightning", *args, "--trainer.enable_progress_bar", "false"]
    proc = subprocess.run(command + overwrite, cwd=ROOT, capture_output=True, text=True)
    total = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"zskd {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    metrics = dict(re.findall(r"(test/\w+)\s+([0-9.]+)", proc.stdout))
    # Synthesis time comes from the cache's manifest, also when an earlier run made the cache and this one
    # reused it (a reused cache's manifest is not rewritten).
    manifest_after = manifest_text()
    synthesis = earlier_runs = 0.0
    if manifest_after is not None:
        finished = json.loads(manifest_after)
        synthesis, earlier_runs = finished["wall_seconds"], finished.get("resumed_seconds", 0.0)
    cache_was_ready = manifest_before is not None and manifest_before == manifest_after
    online = ONLINE_LINE.search(proc.stdout + proc.stderr)
    if online is not None:  # synthesis ran during distillation (no cache): its rounds' time is the synthesis time
        synthesis = float(online.group(2))
    result = {
        "test_acc": 100 * float(metrics["test/acc"]),
        "teacher_acc": 100 * float(metrics.get("test/teacher_acc", metrics["test/acc"])),
        "synthesis_s": synthesis + earlier_runs,
        "total_s": total,
        "training_s": total if cache_was_ready else max(total - synthesis, 0.0),
    }
    if online is not None:
        result["synthesized"] = float(online.group(1))
    return result


def replace_measurement(records: list[dict[str, str]], new: dict[str, str]) -> list[dict[str, str]]:
    """``records`` with ``new`` appended in place of earlier measurements of its row: the same command, or the
    same row, impressions and seed on the same hardware under a command the runner has since changed."""
    key = ("row", "impressions", "seed", "hardware")
    return [r for r in records if r["command"] != new["command"] and any(r[k] != new[k] for k in key)] + [new]


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open() as handle:
        return list(csv.DictReader(handle))


def time_to_accuracy(records: list[dict[str, str]]) -> str:
    """One line: the quickest ZSKD run (synthesis + distillation, from a trained teacher) at TARGET_ACC or above."""
    runs = [(float(r["synthesis_s"]) + float(r["training_s"]), float(r["test_acc"]), r) for r in records if r["method"] == "zskd"]
    if not runs:
        return f"Time to {TARGET_ACC}% (ZSKD, synthesis + distillation): no ZSKD row measured yet."
    reached = [run for run in runs if run[1] >= TARGET_ACC]
    if reached:
        seconds, acc, r = min(reached, key=lambda run: run[0])
        return (f"Time to {TARGET_ACC}% (ZSKD, synthesis + distillation, from a trained teacher): {seconds / 60:.1f} min "
                f"({acc:.2f}%, {r['impressions']} impressions, {r['hardware']}).")
    seconds, acc, r = max(runs, key=lambda run: run[1])
    return (f"Time to {TARGET_ACC}% (ZSKD, synthesis + distillation, from a trained teacher): not reached; the most accurate "
            f"ZSKD row is {acc:.2f}% after {seconds / 60:.1f} min ({r['impressions']} impressions, {r['hardware']}).")


def group_command(group: list[dict[str, str]]) -> str:
    """The command of a row; for a row over several seeds, with the seed written ``S`` (one command for all)."""
    command = group[0]["command"]
    if len(group) > 1:
        seed = re.escape(group[0]["seed"])
        command = re.sub(rf"(--seed_everything |--data\.init_args\.seed )({seed})\b", r"\1S", command)
        command = re.sub(rf"_s{seed}\b", "_sS", command)
    return command


def summarize(records: list[dict[str, str]], out_dir: Path = RESULTS) -> None:
    """Write mnist.md and mnist.png from the CSV records.

    Records measured with other configs than today's (a changed teacher recipe, say) count for nothing: they
    are listed under "Stale rows" with their commands, until re-measured.
    """
    current, stale = [], []
    for r in records:  # one fingerprint per record (each parses its configs)
        (current if is_current(r) else stale).append(r)
    records = current
    teacher = [float(r["test_acc"]) for r in records if r["row"] == "teacher" and r["seed"] == str(TEACHER_SEED)]
    teacher_acc = teacher[-1] if teacher else None  # the teacher the students were distilled from
    lines = [
        "# Data-free MNIST table: LeNet-5 -> LeNet-5-half",
        "",
        "Generated by `benchmarks/mnist_table.py` from `mnist.csv`. Test accuracy of the LAST epoch on the official",
        "MNIST test set (never used for selection). The teacher and the real-data students train on the official",
        "60,000 training images less a 10% validation split; every row also gives the ratio student / teacher.",
        "Times are wall-clock seconds on the row's hardware.",
        "Rows over several seeds give mean ± standard deviation, mean times, and one command with the seed written S.",
        "Online rows (fast) synthesize during distillation into a 6,000-input replay buffer: their impressions are the"
        " inputs synthesized in all, their synthesis time the generator rounds' and their training time the rest.",
        f"Ratios divide by the teacher every student loads (seed {TEACHER_SEED}); the teacher's other seeds only measure"
        " its recipe's spread (command: add `--seed_everything S --trainer.default_root_dir runs/mnist/table/teacher_sS"
        " --trainer.callbacks []`, which keeps the students' checkpoint).",
        "",
        "| row | impressions | seeds | test acc. (%) | ratio to teacher | paper (%) | synthesis (s) | training (s) | hardware | command |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    groups: dict[tuple[str, str, str], list[dict[str, str]]] = {}
    for r in records:
        groups.setdefault((r["row"], r["method"], r["impressions"]), []).append(r)
    paper_key = {"teacher": "teacher", "student_ce": "student_ce", "student_kd": "student_kd", "zskd": "zskd",
                 "zskd_paper": "zskd", "zskd_bf16": "zskd", "wang": "wang", "wang_paper": "wang"}
    for (row, method, n), group in sorted(groups.items(), key=lambda item: (ROW_ORDER.index(item[0][0]), item[0][1], int(item[0][2]))):
        accs = [float(g["test_acc"]) for g in group]
        mean = statistics.mean(accs)
        spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
        ratio = f"{mean / teacher_acc:.4f}" if teacher_acc else ""
        paper = {**PAPER, "wang": PAPER_WANG}.get(paper_key.get(row, ""), "")
        label = f"{row} ({method})" if row.startswith("ablation") else row
        lines.append(
            f"| {label} | {n if n != '0' else '-'} | {','.join(g['seed'] for g in group)} | {mean:.2f}{spread} | {ratio} | {paper} "
            f"| {statistics.mean(float(g['synthesis_s']) for g in group):.0f} | {statistics.mean(float(g['training_s']) for g in group):.0f} "
            f"| {group[0]['hardware']} | `zskd {group_command(group)}` |"
        )
    lines += ["", f"Paper (Nayak et al. 2019, Table 1): teacher {PAPER['teacher']}, Student-CE {PAPER['student_ce']}, "
              f"Student-KD {PAPER['student_kd']}, Lopes et al. {PAPER['lopes']}, ZSKD {PAPER['zskd']}; "
              f"target ratio {PAPER['zskd'] / PAPER['teacher']:.4f}. Wang 2021 (AAAI): {PAPER_WANG} against KD on real "
              "data 99.18.", "", time_to_accuracy(records), ""]
    if stale:
        lines += ["## Stale rows", "",
                  "Measured with configs that have since changed (see `configs_sha` in the runner); not counted above. "
                  "Rerun the runner with these rows and seeds to replace them.", "",
                  "| row | impressions | seed | test acc. (%) | command |", "| --- | ---: | --- | ---: | --- |"]
        lines += [f"| {r['row']} | {r['impressions']} | {r['seed']} | {float(r['test_acc']):.2f} "
                  f"| `zskd {r['command']}` |" for r in stale]
        lines.append("")
    write_text_atomic(out_dir / "mnist.md", "\n".join(lines))
    # The 24,000-impression headline rows are the ablation's last points (the same command is measured once).
    ablation = [r for r in records if r["row"] in ("ablation", "zskd", "ci")]
    if any(r["row"] == "ablation" for r in records):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for method in sorted({r["method"] for r in ablation}):
            by_count: dict[int, list[float]] = {}
            for r in ablation:
                if r["method"] == method:
                    by_count.setdefault(int(r["impressions"]), []).append(float(r["test_acc"]))
            points = sorted((n, statistics.mean(accs)) for n, accs in by_count.items())
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        if teacher_acc:
            ax.axhline(teacher_acc, color="grey", linestyle="--", label="teacher")
        ax.set_xscale("log")
        ax.set_xlabel("impressions")
        ax.set_ylabel("student test accuracy (%)")
        ax.legend()
        fig.tight_layout()
        write_atomic(out_dir / "mnist.png", lambda handle: fig.savefig(handle, format="png", dpi=120))
        plt.close(fig)
    timed = [r for r in records if r["row"] in TIMED_ROWS]
    if any(r["row"] not in ("zskd", "wang") for r in timed):
        plot_accuracy_against_time(timed, teacher_acc, out_dir / "mnist_time.png")


def plot_accuracy_against_time(records: list[dict[str, str]], teacher_acc: float | None, path: Path) -> None:
    """Each run of the :data:`TIMED_ROWS` as a point: test accuracy against synthesis + distillation wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for row in TIMED_ROWS:
        runs = [r for r in records if r["row"] == row]
        if runs:
            minutes = [(float(r["synthesis_s"]) + float(r["training_s"])) / 60 for r in runs]
            ax.scatter(minutes, [float(r["test_acc"]) for r in runs], label=TIMED_ROWS[row])
    if teacher_acc:
        ax.axhline(teacher_acc, color="grey", linestyle="--", label="teacher")
    ax.set_xlabel("synthesis + distillation (min, wall)")
    ax.set_ylabel("student test accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda handle: fig.savefig(handle, format="png", dpi=120))
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+",
                        default=["teacher", "student_ce", "student_kd", "zskd", "ci", "wang", "fast", "ssdkd",
                                 "ssdkd_no_phi", "ssdkd_uniform", "ssdkd_1pct", "ablation"],
                        choices=["teacher", "student_ce", "student_kd", "zskd", "zskd_bf16", "ci", "wang", "fast",
                                 "ssdkd", "ssdkd_no_phi", "ssdkd_uniform", "ssdkd_1pct", "ablation"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--schedule", choices=["fast", "paper"], default="fast")
    parser.add_argument("--summarize", action="store_true", help="only rebuild mnist.md and mnist.png from the CSV")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "mnist.csv"
    records = read_csv(path)
    if args.summarize:
        summarize(records)
        return
    # A row is done when measured with the same command AND the same config files (see configs_sha); rows of
    # other configs are kept in the CSV only while their command is not re-measured.
    done = {(r["command"], r.get("configs_sha", "")) for r in records}
    for row, method, n, seed, zskd_args in row_commands(args.rows, args.seeds, args.schedule):
        command = " ".join(zskd_args)
        fingerprint = configs_sha(zskd_args)
        if (command, fingerprint) in done:
            continue
        if row != "teacher" and not (ROOT / TEACHER_CKPT).exists():
            raise SystemExit(f"train the teacher first (--rows teacher): {TEACHER_CKPT} is missing")
        print(f"[{time.strftime('%H:%M:%S')}] zskd {command}", flush=True)
        result = run_row(zskd_args)
        n = int(result.pop("synthesized", n))
        record = {"row": row, "method": method, "impressions": n, "seed": seed, "hardware": hardware(),
                  "command": command, **{k: f"{v:.4f}" if "acc" in k else f"{v:.1f}" for k, v in result.items()}}
        record["configs_sha"] = fingerprint
        done.add((command, fingerprint))
        records = replace_measurement(records, {k: str(v) for k, v in record.items()})
        write_csv_atomic(path, records, FIELDS)
        summarize(records)
        print(f"    test acc {result['test_acc']:.2f}% in {result['total_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
