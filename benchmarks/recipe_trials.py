"""Synthesis and distillation recipes of a shipped config (impression or online), judged on the validation split.

Each variant is a name and a JSON object of changes to the recipe: ``synthesizer`` (arguments of the config's
synthesizer), ``augmentation`` (arguments of the ``BatchAugmentation`` used while distilling; without it, blends
of pairs, ``{"mix": 0.5}``, NOT the config's own), ``epochs`` (distillation epochs; default the config's
``max_epochs``), ``data`` (other arguments of the config's datamodule, e.g. an online buffer's size) and ``model``
(other arguments of its distillation module, e.g. ``temperature``; ``{"optimizer": {"lr": 0.003}}`` changes the
optimizer's) and ``ema`` (a decay per optimizer step: the student distilled is the exponential moving average of
its weights, Lightning's ``EMAWeightAveraging``).
Everything else comes from the config: its teacher (``--teacher`` swaps in another checkpoint of the same
architecture), student, distillation settings, optimizer, datamodule, and ``eval_data``, whose VALIDATION split
scores the student (the test set is never read). For each variant and seed the teacher's impressions are
synthesized (``--impressions`` of them; an online config keeps its own budget) and a student distilled on them.
Variants that synthesize alike share one impression cache. Adds rows to ``benchmarks/results/recipe_trials.csv``
(replacing earlier ones of the same config, variant, budget and seed) and rewrites ``recipe_trials.md`` beside
it.

    ZSKD_DATA_ROOT=../shared/data python benchmarks/recipe_trials.py --impressions 6000 --seeds 0 1 \\
        --variants 'base={}' 'shifts={"augmentation": {"mix": 0.5, "translate": [0.0625, 0.0625]}}'
    ZSKD_DATA_ROOT=../shared/data python benchmarks/recipe_trials.py --impressions 2000 \\
        --config configs/cifar10/zskd_alexnet_half.yaml --variants 'epochs30={"epochs": 30}'
    ZSKD_DATA_ROOT=../shared/data python benchmarks/recipe_trials.py --config configs/mnist/fast_lenet5_half.yaml \\
        --variants 'affine={"augmentation": {"mix": 0.5, "degrees": 30, "translate": [0.2, 0.2]}}'
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import statistics
import time
from pathlib import Path

import yaml

from table import code_commit
from teacher_sources import FAST_CONFIG, RESULTS, ROOT, cache_use, config_synthesizer, distil_config_student

from zskd_lightning.augment import BatchAugmentation
from zskd_lightning.files import write_csv_atomic, write_text_atomic

FIELDS = ["config", "variant", "changes", "impressions", "seed", "student_val", "seconds", "config_sha", "cache", "commit"]
CHANGE_KEYS = {"synthesizer", "augmentation", "epochs", "data", "model", "ema"}
#: distillation-module arguments the runner sets itself (a variant's "model" may not)
RUNNER_MODEL_KEYS = {"teacher", "student", "lr_scheduler", "export_filename"}
REQUIRED_SECTIONS = [("data", "synthesizer"), ("data", "eval_data"), ("model", "teacher"), ("model", "student"),
                     ("model", "optimizer")]


def parse_variant(text: str) -> tuple[str, dict]:
    """``'name={json}'`` -> ``(name, changes)``; argparse type, so a bad variant ends in one line."""
    name, sep, body = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"a variant is NAME={{json}}, got {text!r}")
    try:
        changes = json.loads(body)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"variant {name!r}: not JSON ({error})") from None
    if not isinstance(changes, dict) or not set(changes) <= CHANGE_KEYS:
        raise argparse.ArgumentTypeError(f"variant {name!r}: expected an object with keys among "
                                         f"{sorted(CHANGE_KEYS)}, got {body}")
    model = changes.get("model", {})
    if not isinstance(model, dict) or not isinstance(model.get("optimizer", {}), dict):
        raise argparse.ArgumentTypeError(f"variant {name!r}: \"model\" is an object of the distillation module's "
                                         f"arguments, its \"optimizer\" an object of the optimizer's, got {body}")
    ema = changes.get("ema")
    if "ema" in changes and (isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0 < ema < 1):
        raise argparse.ArgumentTypeError(f"variant {name!r}: \"ema\" is a decay in (0, 1), got {ema!r}")
    runner_set = sorted(set(model) & RUNNER_MODEL_KEYS)
    if runner_set:
        raise argparse.ArgumentTypeError(f"variant {name!r}: \"model\" cannot set {runner_set}: the runner sets "
                                         "them (--teacher swaps the teacher, \"epochs\" the cosine schedule)")
    return name, changes


def config_sha(config: Path) -> str:
    """The first 12 hex digits of the sha256 of the config's parsed YAML (comments left out): which settings a row
    was measured with."""
    return hashlib.sha256(json.dumps(yaml.safe_load(config.read_text()), sort_keys=True).encode()).hexdigest()[:12]


def is_stale(record: dict[str, str]) -> bool:
    """Whether the row's config has changed since it was measured (rows from before ``config_sha``: no)."""
    config = ROOT / record["config"].split(" (teacher ")[0]
    return bool(record.get("config_sha")) and config.exists() and config_sha(config) != record["config_sha"]


def missing_sections(settings: object) -> list[str]:
    """The parts of a distillation config that the trials read and ``settings`` (a parsed YAML) lacks, as dotted
    names (``data.init_args.synthesizer``, ...)."""
    missing = []
    for part, key in REQUIRED_SECTIONS:
        section = settings.get(part) if isinstance(settings, dict) else None
        init_args = section.get("init_args") if isinstance(section, dict) else None
        if not isinstance(init_args, dict) or key not in init_args:
            missing.append(f"{part}.init_args.{key}")
    return missing


def summarize(records: list[dict[str, str]], path: Path) -> None:
    lines = ["# Recipe trials (validation splits)", "",
             "Generated by `benchmarks/recipe_trials.py`. Students distilled from impressions of a shipped config's",
             "teacher: the config's synthesizer, student and schedule, distilled on blends of pairs (not the config's",
             "own augmentation), plus the variant's changes; accuracy on the validation split of the config's data",
             "(mean ± s.d. over seeds; the test set is never read). A config marked (changed) has changed since the",
             "row was measured: its changes then applied to the config as it was; one marked (unverified) was",
             "measured before rows kept the config's sha256, so whether it changed since cannot be told. Runs of one",
             "variant measured before and after a change are listed apart. Seconds marked * include runs that reused",
             "the impressions another variant (or an earlier run) had made: those runs' seconds are distillation",
             "only.", "",
             "| config | variant | changes | impressions | seeds | student val. acc. (%) | seconds per run |",
             "| --- | --- | --- | ---: | --- | ---: | ---: |"]
    groups: dict[tuple[str, str, str, str, str], list[dict[str, str]]] = {}
    for r in records:
        key = (r["config"], r["variant"], r["changes"], r["impressions"], r.get("config_sha") or "")
        groups.setdefault(key, []).append(r)
    for (config, variant, changes, n, _), group in groups.items():
        config += (" (changed)" if any(is_stale(g) for g in group)
                   else " (unverified)" if not all(g.get("config_sha") for g in group) else "")
        accs = [float(g["student_val"]) for g in group]
        spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
        seconds = statistics.mean(float(g["seconds"]) for g in group)
        reused = "*" if any(g.get("cache") == "reused" for g in group) else ""
        lines.append(f"| {config} | {variant} | `{changes}` | {n} | {','.join(g['seed'] for g in group)} "
                     f"| {statistics.mean(accs):.2f}{spread} | {seconds:.0f}{reused} |")
    write_text_atomic(path, "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=FAST_CONFIG, help="a shipped impression or online config")
    parser.add_argument("--variants", nargs="+", type=parse_variant, default=[("base", {})])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--impressions", type=int, default=6000)
    parser.add_argument("--teacher", type=Path, default=None,
                        help="another checkpoint of the config teacher's architecture (default: the config's)")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "recipe_trials")
    parser.add_argument("--results", type=Path, default=RESULTS / "recipe_trials.csv")
    args = parser.parse_args(argv)
    args.config = args.config.resolve()
    if not args.config.exists():
        raise SystemExit(f"no config at {args.config}")
    config_name = args.config.relative_to(ROOT).as_posix() if args.config.is_relative_to(ROOT) else str(args.config)
    if args.teacher is not None:  # another teacher: other impressions and other rows than the config's teacher's
        config_name += f" (teacher {args.teacher.as_posix()})"
    records = list(csv.DictReader(args.results.open())) if args.results.exists() else []
    try:
        settings = yaml.safe_load(args.config.read_text())
    except yaml.YAMLError as error:
        raise SystemExit(f"{args.config}: not valid YAML ({str(error).splitlines()[0]})") from None
    missing = missing_sections(settings)
    if missing:
        raise SystemExit(f"{args.config}: not a distillation config the trials can run (missing {', '.join(missing)})")
    impression_config = "num_impressions" in settings["data"]["init_args"]
    for name, changes in args.variants:
        synthesis = json.dumps(changes.get("synthesizer", {}), sort_keys=True)
        if changes.get("data"):
            synthesis += json.dumps(changes["data"], sort_keys=True)
        if changes.get("model") and not impression_config:  # online: the student being distilled steers the generator
            synthesis += json.dumps(changes["model"], sort_keys=True)
        cache_key = hashlib.sha256(f"{config_name}|{synthesis}".encode()).hexdigest()[:12]
        for seed in args.seeds:
            started = time.perf_counter()
            cache_dir = args.work_dir / f"{cache_key}_s{seed}_{args.impressions}"
            cache = cache_use(cache_dir)
            measured_with = config_sha(args.config)  # the settings this seed's run reads
            synthesizer = config_synthesizer(args.config, **changes.get("synthesizer", {}))
            augmentation = BatchAugmentation(**changes["augmentation"]) if "augmentation" in changes else None
            accuracy = distil_config_student(args.config, args.impressions, changes.get("epochs"),
                                             cache_dir,
                                             synthesizer=synthesizer, seed=seed, batch_augmentation=augmentation,
                                             teacher=args.teacher, data_changes=changes.get("data"),
                                             model_changes=changes.get("model"), ema_decay=changes.get("ema"))
            record = {"config": config_name, "config_sha": measured_with, "variant": name,
                      "changes": json.dumps(changes, sort_keys=True),
                      "impressions": str(args.impressions) if impression_config else "online", "seed": str(seed),
                      "student_val": f"{accuracy:.2f}",
                      "seconds": f"{time.perf_counter() - started:.0f}",
                      "cache": cache if impression_config else "online", "commit": code_commit()}
            key = (config_name, name, record["impressions"], str(seed))
            records = [r for r in records if (r["config"], r["variant"], r["impressions"], r["seed"]) != key] + [record]
            args.results.parent.mkdir(parents=True, exist_ok=True)
            write_csv_atomic(args.results, records, FIELDS)
            summarize(records, args.results.with_suffix(".md"))
            print(f"{name} seed {seed}: student {accuracy:.2f}% (validation split), "
                  f"{record['seconds']} s", flush=True)


if __name__ == "__main__":
    main()
