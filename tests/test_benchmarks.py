"""The benchmark scripts run end to end at a tiny size (their figures are only meaningful at full size)."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from helpers.tiny import one_torch_thread  # noqa: F401  (module-wide autouse fixture)
from helpers.tiny import write_mnist_idx

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    """The benchmark script ``name`` as a module; its imports of sibling scripts (``teacher_sources``,
    ``timing``) resolve as when it runs as a script, whose folder Python puts first on the path."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


#: What a benchmark records in its ``commit`` column for this checkout (table.code_commit: short hash, "+local" for
#: uncommitted library or config changes; "" without git).
COMMIT = load("table").code_commit()


def test_synthesis_throughput_prints_every_path_with_its_ratio(capsys):
    throughput = load("synthesis_throughput")
    throughput.main(["--impressions", "8", "--iterations", "2", "--chunk", "4", "--plain-batch", "4", "--repeats", "2",
                     "--device", "cpu", "--skip-memory", "--generator-rounds", "1", "--generator-steps", "1"])
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith(("lenet5", "alexnet")) and "finished" not in line]
    generator = [row for row in rows if " generator " in row]
    rows = [row for row in rows if row not in generator]
    assert len(rows) == 2 * 3  # per model: plain loop, library 32-true, library bf16-mixed
    assert len(generator) == 2 * 3  # the online path, CIFAR and MNIST shapes
    assert sorted(row.split()[0] for row in generator) == ["alexnet"] * 3 + ["lenet5"] * 3
    for row in generator:
        ips, ratio = (float(v) for v in re.findall(r"\s(\d+(?:\.\d+)?)", row)[-2:])
        assert ips > 0 and ratio > 0
    for row in rows:
        assert row.endswith(" -")  # no memory column under --skip-memory
        ips, ratio = (float(v) for v in re.findall(r"\s(\d+(?:\.\d+)?)", row)[-2:])
        assert ips > 0 and ratio > 0
    assert sum("plain loop" in row for row in rows) == 2
    assert sum("library (bf16-mixed)" in row for row in rows) == 2
    schedule = [line for line in lines if "finished impressions/s" in line]
    assert len(schedule) == 2  # LeNet-5 only, one per library precision
    assert f"the fast config's {throughput.fast_config_iterations()}" in schedule[0]
    assert float(schedule[0].rsplit("ratio", 1)[1]) > 0


def test_synthesis_throughput_takes_one_iterations_value_or_one_per_model(capsys):
    """Values were matched to models by position: ``--models alexnet`` alone ran at LeNet-5's default."""
    throughput = load("synthesis_throughput")
    with pytest.raises(SystemExit) as exit_info:
        throughput.main(["--models", "lenet5", "alexnet", "--iterations", "1", "2", "3"])
    assert exit_info.value.code == 2
    assert "--iterations takes one value or one per model (2: lenet5 alexnet), got 3" in capsys.readouterr().err
    assert throughput.ITERATIONS == {"lenet5": 40, "alexnet": 10}


def test_benchmark_timing_interleaves_the_variants():
    """Each run times every variant in turn, so that a slow spell falls on all of them."""
    order = []
    figures = load("timing").seconds_per_call({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                                              repeats=2, runs=3)
    assert order == ["a", "b"] + ["a", "a", "b", "b"] * 3
    assert set(figures) == {"a", "b"} and all(seconds >= 0 for seconds in figures.values())


def test_lopes_spectral_fit_keeps_as_many_units_as_spectral_numbers():
    """Per-layer rounding kept 21 units against 22 spectral numbers (LeNet-5's 120 + 84 + 10 at 10%)."""
    unit_subset = load("lopes_spectral_fit").unit_subset
    for total in (2, 11, 22, 54, 107, 214):
        columns = unit_subset([120, 84, 10], total)
        assert columns.shape == (214, total)
        picked = columns.argmax(dim=0)
        assert len(picked.unique()) == total and torch.equal(columns.sum(dim=0), torch.ones(total, dtype=columns.dtype))
    picked = unit_subset([120, 84, 10], 22).argmax(dim=0)
    assert [int(((picked >= lo) & (picked < hi)).sum()) for lo, hi in ((0, 120), (120, 204), (204, 214))] == [12, 9, 1]
    for sizes, total in (([1000, 1, 1], 3), ([100, 1, 1, 1], 4), ([5000, 3000], 7999)):  # one unit a layer at least
        picked = unit_subset(sizes, total).argmax(dim=0)
        assert len(picked.unique()) == total
        edges = torch.tensor([0, *sizes]).cumsum(0)
        assert all(((picked >= lo) & (picked < hi)).any() for lo, hi in zip(edges[:-1], edges[1:]))
    with pytest.raises(ValueError, match="total must be in 1..214"):
        unit_subset([120, 84, 10], 215)


def test_synthesis_throughput_measures_a_paths_memory_in_a_fresh_process():
    throughput = load("synthesis_throughput")
    batch = 128
    memory = throughput.memory_of_paths("lenet5", ["plain"], iterations=2, plain_batch=batch, chunk=4,
                                        device=torch.device("cpu"))
    if math.isnan(memory["plain"]):  # the peak cannot be reset here (/proc/self/clear_refs): no figure, by design
        pytest.skip("this system cannot reset a process's peak memory")
    # At least the impressions, their gradient and two Adam moments: [128, 1, 32, 32] float32 each. (In the
    # benchmark's own process an earlier path's freed pages would be reused and this could read 0.)
    assert memory["plain"] >= 4 * batch * 32 * 32 * 4 / 2**20


def test_table_names_the_cpu_model_a_row_ran_on(tmp_path):
    table = load("table")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9654, 96-Core\nflags\t: avx2\n\n"
                       "processor\t: 1\nmodel name\t: AMD EPYC 9654, 96-Core\n")
    assert table.cpu_model(cpuinfo) == "AMD EPYC 9654  96-Core"  # no comma to split a CSV column by hand
    cpuinfo.write_text("processor\t: 0\nflags\t: neon\n")
    assert table.cpu_model(cpuinfo) == ""
    assert table.cpu_model(tmp_path / "missing") == ""


def test_table_keeps_schedules_seeds_and_the_students_teacher_apart():
    table = load("table")
    config = yaml.safe_load((table.ROOT / table.MNIST.teacher_config).read_text())
    assert config["seed_everything"] == table.MNIST.teacher_seed
    teacher = {seed: args for row, _, _, seed, args in table.row_commands(table.MNIST, ["teacher"], [0, 1, 2], "fast")}
    assert teacher[0] == ["fit", "--config", table.MNIST.teacher_config]  # the checkpoint every student loads
    for seed in (1, 2):  # the others must not overwrite it
        assert teacher[seed][-2:] == ["--trainer.callbacks", "[]"] and f"teacher_s{seed}" in " ".join(teacher[seed])
    fast = table.row_commands(table.MNIST, ["zskd", "zskd_bf16"], [0], "fast")
    paper = table.row_commands(table.MNIST, ["zskd"], [0], "paper")
    assert [plan[0] for plan in fast] == ["zskd", "zskd_bf16"] and paper[0][0] == "zskd_paper"
    caches = {args[args.index("--data.init_args.cache_dir") + 1] for *_, args in fast + paper}
    assert len(caches) == 3  # no two rows share an impression cache
    assert "--data.init_args.synthesizer.init_args.precision" in fast[1][4]
    group = [{"command": " ".join(table.row_commands(table.MNIST, ["zskd"], [seed], "fast")[0][4]), "seed": str(seed)} for seed in (1, 2)]
    command = table.group_command(group)
    assert "--seed_everything S" in command and "_sS" in command and " 1" not in command.replace("24000", "")


def test_table_fingerprints_settings_not_comments_and_the_teacher_only_where_loaded(tmp_path):
    table = load("table")
    shutil.copytree(table.ROOT / "configs" / "mnist", tmp_path / "configs" / "mnist")
    table.ROOT = tmp_path
    kd, ce = (table.row_commands(table.MNIST, [row], [0], "fast")[0][4] for row in ("student_kd", "student_ce"))
    before = table.configs_sha(table.MNIST, kd), table.configs_sha(table.MNIST, ce)
    teacher = tmp_path / table.MNIST.teacher_config
    teacher.write_text("# a new comment\n" + teacher.read_text())
    assert (table.configs_sha(table.MNIST, kd), table.configs_sha(table.MNIST, ce)) == before
    teacher.write_text(teacher.read_text().replace("filename: last, save_top_k: 1", "save_last: true, save_top_k: 2"))
    assert "save_top_k: 2" in teacher.read_text()  # when checkpoints are saved measures nothing: still current
    assert (table.configs_sha(table.MNIST, kd), table.configs_sha(table.MNIST, ce)) == before
    teacher.write_text(teacher.read_text().replace("max_epochs: 60", "max_epochs: 61"))
    assert table.configs_sha(table.MNIST, kd) != before[0]  # distils from the teacher: stale
    assert table.configs_sha(table.MNIST, ce) == before[1]  # trains on labels alone: still current


def test_table_counts_the_committed_teacher_file_as_the_checkpoint_it_was_written_from(tmp_path):
    """Students' configs load the committed teacher (with its sha256); rows measured when they loaded the
    training run's checkpoint (the same weights) stay current, and another teacher file does not."""
    table = load("table")
    shutil.copytree(table.ROOT / "configs" / "mnist", tmp_path / "configs" / "mnist")
    table.ROOT = tmp_path
    kd = table.row_commands(table.MNIST, ["student_kd"], [0], "fast")[0][4]
    config = tmp_path / kd[kd.index("--config") + 1]
    committed = config.read_text()
    assert table.MNIST.teacher_file in committed and "sha256:" in committed
    sha_committed = table.configs_sha(table.MNIST, kd)
    config.write_text(re.sub(r"init_args:\n\s+checkpoint: \S+\n\s+sha256: \S+",
                             f"init_args: {{checkpoint: {table.MNIST.teacher_ckpt}}}", committed))
    assert table.MNIST.teacher_file not in config.read_text()
    assert table.configs_sha(table.MNIST, kd) == sha_committed
    config.write_text(committed.replace(table.MNIST.teacher_file, "benchmarks/teachers/other.safetensors"))
    assert table.configs_sha(table.MNIST, kd) != sha_committed


def test_table_reports_stale_rows_apart_and_counts_only_current_ones(tmp_path, monkeypatch):
    table = load("table")
    monkeypatch.setattr(table, "contains_commit", lambda commit, ancestor: None)  # order marks: their own test

    def record(row: str, seed: int, acc: float, current: bool = True) -> dict[str, str]:
        args = table.row_commands(table.MNIST, [row], [seed], "fast")[0][4]
        sha = table.configs_sha(table.MNIST, args) if current else "0" * 12
        return {"row": row, "method": "kd-real" if row == "student_kd" else "ce-real", "impressions": "0",
                "seed": str(seed), "test_acc": str(acc), "teacher_acc": "99.0", "synthesis_s": "0.0", "total_s": "1.0",
                "hardware": "CPU", "command": " ".join(args), "configs_sha": sha, "training_s": "1.0"}

    table.summarize(table.MNIST, [record("teacher", 0, 99.0), record("student_kd", 0, 98.0), record("student_kd", 1, 50.0, False)],
                    out_dir=tmp_path)
    report = (tmp_path / "mnist.md").read_text()
    main_table, stale = report.split("## Stale rows")
    kd_line = next(line for line in main_table.splitlines() if line.startswith("| student_kd"))
    assert "| 0 | 98.00 | 0.9899 |" in kd_line  # seed 1 (other configs) neither averaged nor listed here
    assert "| student_kd | 0 | 1 | 50.00 |" in stale and "--seed_everything 1" in stale
    gone = record("student_kd", 2, 97.0)  # a record naming a config since removed is stale, not an error
    gone["command"] = gone["command"].replace("kd_real_lenet5_half.yaml", "removed.yaml")
    assert table.is_current(table.MNIST, record("student_kd", 2, 97.0)) and not table.is_current(table.MNIST, gone)
    argued = record("student_kd", 2, 97.0)  # the same configs, an argument the runner no longer gives the row
    argued["command"] += " --data.init_args.batch_size 64"
    assert argued["configs_sha"] == table.configs_sha(table.MNIST, argued["command"].split())
    assert not table.is_current(table.MNIST, argued)


def test_table_records_the_commit_and_marks_times_taken_with_a_subnormal_teacher(tmp_path):
    """Rows that distilled from the teacher before its subnormal weights were set to zero (no commit recorded)
    have their times marked as upper bounds; rows with a commit, or without a teacher, are not marked."""
    table = load("table")
    in_git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=BENCHMARKS.parent, capture_output=True).returncode == 0
    if in_git and not os.environ.get(table.COMMIT_VARIABLE):
        assert re.fullmatch(r"[0-9a-f]{7}(\+local)?", table.code_commit())
    elif not in_git:  # a tarball or sdist (or git refusing the folder): the commit it is given, else unknown
        assert table.code_commit() == os.environ.get(table.COMMIT_VARIABLE, table.UNKNOWN_COMMIT)

    def record(row: str, commit: str) -> dict[str, str]:
        args = table.row_commands(table.MNIST, [row], [0], "fast")[0][4]
        return {"row": row, "method": "kd-real" if row == "student_kd" else "ce-real", "impressions": "0",
                "seed": "0", "test_acc": "98.0", "teacher_acc": "99.0", "synthesis_s": "0.0", "total_s": "7.0",
                "hardware": "CPU", "command": " ".join(args), "configs_sha": table.configs_sha(table.MNIST, args),
                "training_s": "7.0", "commit": commit}

    def lines(records: list[dict[str, str]]) -> dict[str, str]:
        table.summarize(table.MNIST, records, out_dir=tmp_path)
        report = (tmp_path / "mnist.md").read_text()
        return {row: next(line for line in report.splitlines() if line.startswith(f"| {row} |"))
                for row in ("teacher", "student_kd")} | {"footnote": "† Measured before commit" in report}

    before = lines([record("teacher", ""), record("student_kd", "")])
    assert "| 7† |" in before["student_kd"] and "†" not in before["teacher"] and before["footnote"]
    after = lines([record("teacher", ""), record("student_kd", "abc1234")])
    assert "†" not in after["student_kd"] and not after["footnote"]


def test_table_marks_rows_measured_before_a_change_of_what_their_command_does(tmp_path, monkeypatch):
    """Offline and real-data rows measured before the keyed training order (their command now draws another order)
    carry a mark and its footnote; online rows, and rows measured after it, do not. SSD-KD rows with the diversity
    part on, measured before it counted the teacher's predicted classes, carry another."""
    table = load("table")

    def record(row: str, commit: str) -> dict[str, str]:
        args = table.row_commands(table.MNIST, [row], [0], "fast")[0][4]
        return {"row": row, "method": row, "impressions": "0", "seed": "0", "test_acc": "97.0", "teacher_acc": "99.0",
                "synthesis_s": "1.0", "total_s": "2.0", "hardware": "CPU", "command": " ".join(args),
                "configs_sha": table.configs_sha(table.MNIST, args), "training_s": "1.0", "commit": commit}

    def contains(commit: str, ancestor: str) -> bool | None:
        assert ancestor in (table.KEYED_ORDER, table.DIVERSITY_FIX)
        return {"old1234": False, "new1234": True}.get(commit, False if not commit else None)

    monkeypatch.setattr(table, "contains_commit", contains)

    def lines(records: list[dict[str, str]], mark: str = "‡", since: str = table.KEYED_ORDER
              ) -> tuple[dict[str, str], bool]:
        table.summarize(table.MNIST, records, out_dir=tmp_path)
        report = (tmp_path / "mnist.md").read_text()
        rows = {r["row"]: next(line for line in report.splitlines() if line.startswith(f"| {r['row']} |")) for r in records}
        return rows, f"{mark} Measured before commit {since}" in report

    rows, footnote = lines([record("teacher", "new1234"), record("zskd", "old1234"), record("student_ce", ""),
                            record("ssdkd", "old1234"), record("wang", "unknown")])
    assert "97.00‡ |" in rows["zskd"] and "97.00‡ |" in rows["student_ce"] and footnote
    assert "‡" not in rows["teacher"] and "‡" not in rows["ssdkd"]  # measured after it; online (no loader order)
    assert "‡" not in rows["wang"]  # git cannot tell: no claim either way
    _, footnote = lines([record("teacher", "new1234"), record("zskd", "new1234")])
    assert not footnote
    # SSD-KD rows whose modulating function counted the buffer's labels (diversity on, sampled classes, measured
    # before the fix): CIFAR-10's. MNIST's label inputs by the teacher's argmax (classes: teacher): unchanged.
    def cifar_record(row: str, commit: str) -> dict[str, str]:
        args = table.row_commands(table.CIFAR10, [row], [0], "fast")[0][4]
        return {**record("teacher", commit), "row": row, "method": row, "command": " ".join(args),
                "configs_sha": table.configs_sha(table.CIFAR10, args)}

    assert table.diversity_counted_labels(table.CIFAR10, cifar_record("ssdkd", "old1234"))
    assert not table.diversity_counted_labels(table.CIFAR10, cifar_record("ssdkd", "new1234"))
    assert not table.diversity_counted_labels(table.CIFAR10, cifar_record("fast", "old1234"))
    table.summarize(table.CIFAR10, [cifar_record("ssdkd", "old1234")], out_dir=tmp_path)
    report = (tmp_path / "cifar10.md").read_text()
    assert "97.00¶ |" in report and f"¶ Measured before commit {table.DIVERSITY_FIX}" in report
    rows, footnote = lines([record("teacher", "new1234"), record("ssdkd", "old1234"), record("ssdkd_off", "old1234")],
                           mark="¶", since=table.DIVERSITY_FIX)
    assert not footnote and not any("¶" in line for line in rows.values())
    mnist = table.row_commands(table.MNIST, ["ssdkd"], [0], "fast")[0][4]
    assert table.reads_diversity(mnist) and table.synthesizer_settings(mnist)["classes"] == "teacher"
    args = table.row_commands(table.MNIST, ["ssdkd_off"], [0], "fast")[0][4]
    assert table.config_setting(args, "model", "init_args", "sample_weights") is None and not table.reads_diversity(args)


def test_table_divides_each_row_by_the_teacher_its_runs_recorded(tmp_path, monkeypatch):
    """A distilled row's ratio uses the teacher accuracy its runs recorded (marked when it is not the table's
    teacher); Student-CE, which records its own accuracy there, divides by the table's teacher."""
    table = load("table")
    monkeypatch.setattr(table, "contains_commit", lambda commit, ancestor: None)

    def record(row: str, seed: int, acc: float, teacher: float) -> dict[str, str]:
        args = table.row_commands(table.MNIST, [row], [seed], "fast")[0][4]
        return {"row": row, "method": {"student_kd": "kd-real", "zskd": "zskd"}.get(row, "ce-real"), "impressions": "0",
                "seed": str(seed), "test_acc": str(acc), "teacher_acc": str(teacher), "synthesis_s": "0.0",
                "total_s": "1.0", "hardware": "CPU", "command": " ".join(args),
                "configs_sha": table.configs_sha(table.MNIST, args), "training_s": "1.0", "commit": "abc1234"}

    def lines(records: list[dict[str, str]]) -> tuple[dict[str, str], str]:
        table.summarize(table.MNIST, records, out_dir=tmp_path)
        report = (tmp_path / "mnist.md").read_text()
        return {r["row"]: next(line for line in report.splitlines() if line.startswith(f"| {r['row']} |"))
                for r in records}, report

    rows, report = lines([record("teacher", 0, 99.0, 99.0), record("student_ce", 0, 98.5, 98.5),
                          record("student_kd", 0, 98.0, 99.0), record("zskd", 0, 97.0, 98.0)])
    assert "| 0.9949 |" in rows["student_ce"] and "| 0.9899 |" in rows["student_kd"]
    assert "| 0.9898§ |" in rows["zskd"] and "§ Distilled from a teacher of another accuracy than the table's (99.00%)" in report
    _, report = lines([record("teacher", 0, 99.0, 99.0), record("zskd", 0, 97.0, 99.0)])
    assert "§" not in report


def test_contains_commit_reads_git_history(tmp_path, monkeypatch):
    table = load("table")

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True,
                              text=True).stdout.strip()

    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "first")
    first = git("rev-parse", "--short=7", "HEAD")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "second")
    second = git("rev-parse", "--short=7", "HEAD")
    monkeypatch.setattr(table, "ROOT", tmp_path)
    assert table.contains_commit(second + "+local", first) is True
    assert table.contains_commit(first, second) is False
    assert table.contains_commit("", first) is False
    assert table.contains_commit("0000000", first) is None  # not in this history


def test_table_row_that_changes_only_the_distillation_reads_another_rows_impressions():
    table = load("table")
    plans = {row: args for row, _, _, _, args in table.row_commands(
        table.MNIST, ["wang_its900", "wang_its900_240ep"], [1], "fast")}

    def value(args, key):
        return args[args.index(key) + 1]

    shared, own = plans["wang_its900_240ep"], plans["wang_its900"]
    assert value(shared, "--data.init_args.cache_dir") == value(own, "--data.init_args.cache_dir")
    assert value(shared, "--data.init_args.cache_dir").endswith("wang_its900_fast_24000_s1")
    # its checkpoints stay apart: a resumed run never continues the other row's training
    assert value(shared, "--trainer.default_root_dir") != value(own, "--trainer.default_root_dir")
    assert table.synthesis_steps(shared) == table.synthesis_steps(own) == 900
    # every row that reads another row's caches synthesizes exactly like it (else the CLI would replace them)
    for dataset in table.DATASETS.values():
        for row in dataset.rows:
            if row.impressions_variant is not None:
                source = next(r for r in dataset.rows if r.method == row.method and r.variant == row.impressions_variant)
                reader, made = (table.row_commands(dataset, [r.name], [0], "fast")[0][4] for r in (row, source))
                assert table.synthesizer_settings(reader) == table.synthesizer_settings(made), row.name


def test_table_remeasures_a_row_whose_cache_holds_other_impressions(tmp_path, monkeypatch):
    """Data-free rows let the CLI replace a stale cache (other settings or teacher); a reused one costs no
    synthesis time."""
    table = load("table")
    monkeypatch.setattr(table, "ROOT", tmp_path)
    args = table.row_commands(table.MNIST, ["zskd"], [0], "fast")[0][4]
    assert "--data.init_args.overwrite_cache" not in args  # the recorded command stays the user's command
    manifest = tmp_path / args[args.index("--data.init_args.cache_dir") + 1] / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text('{"wall_seconds": 9.0, "teacher_fingerprint": "old"}')
    commands = []

    def fake_zskd(command, cwd, run_dir):
        commands.append(command)
        if "new" not in manifest.read_text():  # overwrite_cache: the CLI replaces the old teacher's cache
            manifest.write_text('{"wall_seconds": 3.0, "teacher_fingerprint": "new"}')
        return subprocess.CompletedProcess(command, 0, "test/acc 0.975\ntest/teacher_acc 0.99\n", "")

    monkeypatch.setattr(table, "run_watched", fake_zskd)
    synthesized, reused = table.run_row(args), table.run_row(args)
    assert all(command[-2:] == ["--data.init_args.overwrite_cache", "true"] for command in commands)
    assert synthesized["test_acc"] == 97.5 and synthesized["synthesis_s"] == 3.0
    assert synthesized["training_s"] == max(synthesized["total_s"] - 3.0, 0.0)
    assert reused["synthesis_s"] == 3.0 and reused["training_s"] == reused["total_s"]

    teacher_args = table.row_commands(table.MNIST, ["teacher"], [0], "fast")[0][4]
    table.run_row(teacher_args)
    assert "--data.init_args.overwrite_cache" not in commands[-1]  # rows without a cache get no cache flag

    def other_failure(command, cwd, run_dir):
        return subprocess.CompletedProcess(command, 1, "", "RuntimeError: out of memory")

    monkeypatch.setattr(table, "run_watched", other_failure)
    with pytest.raises(table.RowFailed, match=r"exited 1: RuntimeError: out of memory$"):
        table.run_row(args)


def test_a_rows_command_is_watched_while_its_output_is_captured(tmp_path):
    """The runner passes a row's stderr on as it comes and says when an epoch checkpoint appears, and returns
    the output as ``subprocess.run(capture_output=True, text=True)`` would (an epoch saved before is not news)."""
    watched = load("watched")
    checkpoints = tmp_path / "run" / "lightning_logs" / "version_0" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "epoch=0-step=10.ckpt").write_bytes(b"")  # an earlier run's: not reported again
    (checkpoints.parent / "config.yaml").write_text("trainer:\n  max_epochs: 4\n")
    child = ("import sys, time, pathlib\n"
             "print('working', file=sys.stderr, flush=True)\n"
             f"pathlib.Path({str(checkpoints / 'epoch=2-step=30.ckpt')!r}).write_bytes(b'')\n"
             "time.sleep(0.5)\n"
             "print('test/acc 0.5')\n"
             "print('failed here', file=sys.stderr)\n"
             "sys.exit(3)\n")
    echo = io.StringIO()
    proc = watched.run_watched([sys.executable, "-c", child], cwd=tmp_path, run_dir=tmp_path / "run", echo=echo,
                               poll_seconds=0.1)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "test/acc 0.5\n", "working\nfailed here\n")
    lines = echo.getvalue().splitlines()
    assert lines[0] == "  | working" and "  | failed here" in lines
    assert [line for line in lines if "saved" in line] and all(
        re.fullmatch(r"  \| \[\d\d:\d\d:\d\d\] epoch 3/4 saved, \d+ min into this run", line)
        for line in lines if "saved" in line)
    assert watched.saved_epochs(tmp_path / "nothing") == 0 and watched.planned_epochs(tmp_path / "nothing") is None


def test_table_records_the_lopes_metadata_once_before_its_rows(tmp_path, monkeypatch):
    """A Lopes row reads the teacher's activation metadata: the runner records it when missing or recorded by other
    settings (its config changed since), never twice for the same settings."""
    table = load("table")
    monkeypatch.setattr(table, "ROOT", tmp_path)
    shutil.copytree(BENCHMARKS.parent / "configs", tmp_path / "configs")  # the recipe's fingerprint reads them
    metadata, record_args = table.LOPES_RECORD
    commands = []

    def fake_zskd(command, cwd, check):
        commands.append(command)
        (tmp_path / metadata).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / metadata).write_bytes(b"metadata")
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(table.subprocess, "run", fake_zskd)
    table.prepare_row(table.MNIST, "zskd")  # declares nothing
    assert commands == []
    table.prepare_row(table.MNIST, "lopes_top")
    table.prepare_row(table.MNIST, "lopes_all_authors")
    assert len(commands) == 1 and commands[0][3:5] == ["record", "--config"]
    assert " ".join(commands[0][3:]).startswith(record_args)
    record_config = tmp_path / record_args.split()[-1]
    record_config.write_text(record_config.read_text().replace("temperature: 8.0", "temperature: 4.0"))
    table.prepare_row(table.MNIST, "lopes_top")  # the metadata of temperature 8 no longer fits: recorded again
    table.prepare_row(table.MNIST, "lopes_all")
    assert len(commands) == 2
    (tmp_path / (metadata + ".recipe")).unlink()  # a file from before the runner kept its recipe: recorded again
    table.prepare_row(table.MNIST, "lopes_top")
    assert len(commands) == 3


def test_table_ends_a_failed_row_in_one_line_and_keeps_the_rows_before_it(tmp_path, monkeypatch, capsys):
    """A row whose metadata command or own command fails stops the runner with one line naming the command;
    rows measured earlier stay in the CSV."""
    table = load("table")
    monkeypatch.setattr(table, "ROOT", tmp_path)
    monkeypatch.setattr(table, "RESULTS", tmp_path / "results")
    shutil.copytree(BENCHMARKS.parent / "configs", tmp_path / "configs")  # the rows' fingerprints read them
    (tmp_path / table.MNIST.teacher_file).parent.mkdir(parents=True)
    (tmp_path / table.MNIST.teacher_file).write_bytes(b"teacher")

    def failing_record(command, cwd, check):
        return subprocess.CompletedProcess(command, 2)

    monkeypatch.setattr(table.subprocess, "run", failing_record)
    with pytest.raises(SystemExit) as stopped:
        table.main(["--dataset", "mnist", "--rows", "lopes_top", "--seeds", "0"])
    message = str(stopped.value.code)
    assert "\n" not in message and message.startswith("table.py: zskd record --config") and "exited 2" in message
    assert table.LOPES_RECORD[0] in message

    monkeypatch.setattr(table, "code_commit", lambda: "abc1234")

    def measured_then_failing(command, cwd, run_dir):
        if "--seed_everything 0" in " ".join(command):
            return subprocess.CompletedProcess(command, 0, "test/acc 0.975\ntest/teacher_acc 0.99\n", "")
        return subprocess.CompletedProcess(command, 1, "", "Traceback (most recent call last):\nValueError: bad key")

    monkeypatch.setattr(table, "run_watched", measured_then_failing)
    with pytest.raises(SystemExit) as stopped:
        table.main(["--dataset", "mnist", "--rows", "zskd", "--seeds", "0", "1"])
    message = str(stopped.value.code)
    assert "\n" not in message and "--seed_everything 1" in message and message.count("ValueError: bad key") == 1
    assert "Traceback" in capsys.readouterr().err  # the failed command's context, above the one line
    records = table.read_csv(tmp_path / "results" / "mnist.csv")
    assert [(r["row"], r["seed"], r["test_acc"]) for r in records] == [("zskd", "0", "97.5000")]


def test_table_times_a_resumed_row_with_the_chunks_an_earlier_run_finished(tmp_path, monkeypatch):
    """An interrupted row's synthesis time adds the manifest's resumed seconds to this run's wall time."""
    table = load("table")
    monkeypatch.setattr(table, "ROOT", tmp_path)
    args = table.row_commands(table.MNIST, ["zskd"], [0], "fast")[0][4]
    manifest = tmp_path / args[args.index("--data.init_args.cache_dir") + 1] / "manifest.json"
    manifest.parent.mkdir(parents=True)

    def fake_zskd(command, cwd, run_dir):  # resumes a cache whose chunk 0 an earlier run made
        manifest.write_text(json.dumps({"wall_seconds": 13.0, "resumed_chunks": 1, "resumed_seconds": 4.0}))
        return subprocess.CompletedProcess(command, 0, "test/acc 0.9\n", "")

    monkeypatch.setattr(table, "run_watched", fake_zskd)
    resumed = table.run_row(args)
    assert resumed["synthesis_s"] == 13.0 + 4.0  # chunk 0 resumed; the others made by this run
    assert resumed["training_s"] == max(resumed["total_s"] - 13.0, 0.0)


def test_table_reads_an_online_rows_synthesis_from_its_log(tmp_path, monkeypatch):
    """An online row (no cache): the inputs synthesized and the rounds' time come from the driver's last line."""
    table = load("table")
    monkeypatch.setattr(table, "ROOT", tmp_path)
    row, method, _, seed, args = table.row_commands(table.MNIST, ["fast"], [1], "fast")[0]
    assert (row, method, seed) == ("fast", "fast", 1) and "--data.init_args.cache_dir" not in args

    def fake_zskd(command, cwd, run_dir):
        log = "Online synthesis: 223 rounds, 57088 inputs synthesized in 468.3 s; buffer 6000/6000\n"
        return subprocess.CompletedProcess(command, 0, "test/acc 0.95\ntest/teacher_acc 0.99\n", log)

    monkeypatch.setattr(table, "run_watched", fake_zskd)
    result = table.run_row(args, online=True)
    assert result["synthesized"] == 57088 and result["synthesis_s"] == 468.3
    assert result["training_s"] == result["total_s"] - 468.3 and result["test_acc"] == 95.0


def test_table_times_a_resumed_online_row_from_its_cumulative_figures(tmp_path, monkeypatch):
    """The checkpoint carries the rounds' time across runs: 600 s before the stop and 400 s of rounds in all
    leave 200 s (plus this run's) of training, not the earlier 600 s plus a clamped difference. A resumed run
    that prints no rounds line (it trained nothing) is refused, not recorded with synthesis 0."""
    table = load("table")
    monkeypatch.setattr(table, "ROOT", tmp_path)
    args = table.row_commands(table.MNIST, ["fast"], [1], "fast")[0][4]
    log = "Online synthesis: 223 rounds, 57088 inputs synthesized in 400.0 s; buffer 6000/6000\n"
    monkeypatch.setattr(table, "run_watched", lambda command, cwd, run_dir:
                        subprocess.CompletedProcess(command, 0, "test/acc 0.95\n", log))
    resume = table.Resumption(tmp_path / "last.ckpt", wall_seconds=600.0, training_seconds=600.0)
    result = table.run_row(args, resume, online=True)
    assert result["synthesis_s"] == 400.0 and 600.0 <= result["total_s"]
    assert result["training_s"] == pytest.approx(result["total_s"] - 400.0)
    log = ""
    with pytest.raises(table.RowFailed, match="printed no 'Online synthesis: ...' line"):
        table.run_row(args, resume, online=True)


def test_table_online_rows_fingerprint_every_config_and_plot_accuracy_against_time(tmp_path):
    table = load("table")
    rows = ["ssdkd", "ssdkd_priority_no_phi", "ssdkd_1pct"]
    plans = {row: args for row, _, _, _, args in table.row_commands(table.MNIST, rows, [0], "fast")}
    assert plans["ssdkd_priority_no_phi"].count("--config") == 3
    assert plans["ssdkd_1pct"][-2:] == ["--data.init_args.buffer_size", "600"]
    assert (table.configs_sha(table.MNIST, plans["ssdkd_priority_no_phi"])
            != table.configs_sha(table.MNIST, plans["ssdkd"]))
    records = [{"row": row, "test_acc": acc, "synthesis_s": "60", "training_s": "120"}
               for row, acc in (("zskd", "95"), ("fast", "96"), ("ssdkd", "97"))]
    curves = {"zskd": [(2.0, 90.0), (10.0, 97.0)], "ci": [(2.5, 91.0), (11.0, 96.5)]}
    table.plot_accuracy_against_time(table.MNIST.timed_rows, records, 99.0, tmp_path / "time.png", curves)
    assert (tmp_path / "time.png").stat().st_size > 1000


def test_table_time_to_accuracy_reports_row_means_not_the_best_seed():
    table = load("table")
    dataset = table.MNIST
    method, target = dataset.target

    def record(row, acc, seconds, impressions="24000"):
        return {"row": row, "method": method, "test_acc": str(acc), "synthesis_s": str(seconds), "training_s": "0",
                "impressions": impressions, "hardware": "CPU x2", "seed": "0"}

    records = [record("zskd", acc, 600.0) for acc in (target - 0.9, target + 0.2, target - 0.5)]
    line = table.time_to_accuracy(dataset, records)  # one seed reaches the target, the row's mean does not
    assert "not reached" in line and f"{target - 0.4:.2f}% (mean of 3 seed(s))" in line, line
    line = table.time_to_accuracy(dataset, records + [record("zskd_long", target + 0.1, 1200.0)])
    assert line.endswith(f"20.0 min, row zskd_long: {target + 0.1:.2f}% (mean of 1 seed(s)), 24000 impressions, CPU x2.")
    # one row at several budgets (the ablation): each budget is judged on its own
    ablation = [record("ablation", target - 20, 60.0, "600"), record("ablation", target + 0.3, 900.0, "12000")]
    line = table.time_to_accuracy(dataset, records + ablation)
    assert line.endswith(f"15.0 min, row ablation: {target + 0.3:.2f}% (mean of 1 seed(s)), 12000 impressions, CPU x2.")


def test_a_rows_seeds_on_two_machines_name_both():
    table = load("table")
    group = [{"seed": seed, "hardware": name} for seed, name in (("0", "CPU x2 (x86_64)"), ("1", "CPU x2 (AMD EPYC)"),
                                                                 ("2", "CPU x2 (AMD EPYC)"))]
    assert table.group_hardware(group) == "CPU x2 (x86_64): 0; CPU x2 (AMD EPYC): 1,2"
    assert table.group_hardware(group[1:]) == "CPU x2 (AMD EPYC)"


def test_a_rows_seeds_on_a_gpu_make_a_line_of_their_own(tmp_path, monkeypatch):
    """Seeds of one row on two CPU models pool (their machines named); a GPU's seed of the same row and budget is
    another line: its times must not average with a CPU's."""
    table = load("table")
    monkeypatch.setattr(table, "contains_commit", lambda commit, ancestor: True)

    def record(seed: int, hardware: str, synthesis: float) -> dict[str, str]:
        args = table.row_commands(table.CIFAR10, ["fast"], [seed], "fast")[0][4]
        return {"row": "fast", "method": "fast", "impressions": "40704", "seed": str(seed), "test_acc": "40.0",
                "teacher_acc": "86.0", "synthesis_s": str(synthesis), "total_s": "1.0", "training_s": "100.0",
                "hardware": hardware, "command": " ".join(args), "configs_sha": table.configs_sha(table.CIFAR10, args),
                "commit": "abc1234"}

    records = [record(0, "CPU x2 (x86_64)", 1000.0), record(1, "CPU x2 (AMD EPYC)", 2000.0),
               record(2, "NVIDIA H100 80GB HBM3", 30.0)]
    table.summarize(table.CIFAR10, records, out_dir=tmp_path)
    lines = [line for line in (tmp_path / "cifar10.md").read_text().splitlines() if line.startswith("| fast |")]
    assert len(lines) == 2
    assert "| 0,1 |" in lines[0] and "| 1500 | 100 | CPU x2 (x86_64): 0; CPU x2 (AMD EPYC): 1 |" in lines[0]
    assert "| 2 |" in lines[1] and "| 30 | 100 | NVIDIA H100 80GB HBM3 |" in lines[1]


def test_a_copy_without_git_records_the_commit_it_is_given_or_unknown(tmp_path, monkeypatch):
    """A lent GPU machine runs a copy of the working tree without .git: its records took "" for their commit,
    which the table reads as "measured before every fix" (marked ‡, †). Now they carry ZSKD_CODE_COMMIT, else
    "unknown", which is marked nothing and named in one line as a commit the table cannot place."""
    table = load("table")
    monkeypatch.setattr(table, "ROOT", tmp_path)  # no repository here
    monkeypatch.delenv(table.COMMIT_VARIABLE, raising=False)
    assert table.code_commit() == table.UNKNOWN_COMMIT
    monkeypatch.setenv(table.COMMIT_VARIABLE, "1234abc")
    assert table.code_commit() == "1234abc"
    assert table.contains_commit(table.UNKNOWN_COMMIT, table.KEYED_ORDER) is None
    monkeypatch.setattr(table, "ROOT", BENCHMARKS.parent)
    args = table.row_commands(table.MNIST, ["zskd"], [0], "fast")[0][4]
    record = {"row": "zskd", "method": "zskd", "impressions": "24000", "seed": "0", "test_acc": "97.0",
              "teacher_acc": "99.0", "synthesis_s": "1.0", "total_s": "2.0", "training_s": "1.0", "hardware": "CPU",
              "command": " ".join(args), "configs_sha": table.configs_sha(table.MNIST, args),
              "commit": table.UNKNOWN_COMMIT}
    assert not table.timed_with_subnormals(record) and not table.drawn_in_torch_order(table.MNIST, record)
    table.summarize(table.MNIST, [record], out_dir=tmp_path)
    report = (tmp_path / "mnist.md").read_text()
    line = next(line for line in report.splitlines() if line.startswith("| zskd |"))
    assert "| 97.00 |" in line and "†" not in line and "‡ Measured before" not in report and "† Measured" not in report
    assert "Rows whose commit this clone cannot place (unknown, or outside its history): zskd;" in report


def test_a_lopes_rows_fingerprint_covers_the_recipe_of_the_metadata_it_reads(tmp_path, monkeypatch):
    """A Lopes row reads activation metadata that another config records: changing that config makes its rows
    stale (the runner measures them again), as a change of their own config does; other rows stay current."""
    table = load("table")
    monkeypatch.setattr(table, "ROOT", tmp_path)
    shutil.copytree(BENCHMARKS.parent / "configs", tmp_path / "configs")
    lopes, zskd = (table.row_commands(table.MNIST, [row], [0], "fast")[0][4] for row in ("lopes_top", "zskd"))
    before = table.row_fingerprint(table.MNIST, "lopes_top", lopes), table.row_fingerprint(table.MNIST, "zskd", zskd)
    assert before[1] == table.configs_sha(table.MNIST, zskd)  # rows that read no such file: as before
    record = {"row": "lopes_top", "seed": "0", "command": " ".join(lopes), "configs_sha": before[0]}
    assert table.is_current(table.MNIST, record)
    record_config = tmp_path / table.LOPES_RECORD[1].split()[-1]
    record_config.write_text(record_config.read_text().replace("temperature: 8.0", "temperature: 4.0"))
    assert table.row_fingerprint(table.MNIST, "lopes_top", lopes) != before[0]
    assert table.row_fingerprint(table.MNIST, "zskd", zskd) == before[1]
    assert not table.is_current(table.MNIST, record)


def test_table_time_to_accuracy_curves_average_the_runs_at_each_budget():
    table = load("table")
    records = [{"method": method, "impressions": n, "test_acc": acc, "synthesis_s": seconds, "training_s": "0"}
               for method, n, acc, seconds in (("zskd", "600", "60", "60"), ("zskd", "24000", "97", "600"),
                                               ("zskd", "24000", "99", "720"), ("ci", "600", "65", "30"))]
    assert table.ablation_curves(records, table.run_minutes) == {"ci": [(0.5, 65.0)],
                                                                  "zskd": [(1.0, 60.0), (11.0, 98.0)]}


def test_table_plots_each_data_free_run_at_its_budget_where_there_is_no_ablation(tmp_path):
    table = load("table")
    plans = {row: args for row, _, _, _, args in table.row_commands(table.CIFAR10, ["student_ce", "zskd", "ssdkd"], [0],
                                                                     "fast")}
    records = [{"row": row, "test_acc": acc, "impressions": n, "command": " ".join(plans[row]), "synthesis_s": "60",
                "training_s": "120"} for row, acc, n in (("student_ce", "85", "0"), ("zskd", "34", "4000"),
                                                         ("ssdkd", "50", "40704"))]
    zskd_iterations = table.synthesizer_settings(plans["zskd"])["iterations"]
    assert [table.impression_iterations(r) for r in records] == [None, 4000 * zskd_iterations, 40704 * 5]
    table.plot_accuracy_against_budget(table.CIFAR10.timed_rows, records, 86.6, tmp_path / "budget.png")
    assert (tmp_path / "budget.png").stat().st_size > 1000


def test_table_replaces_earlier_measurements_of_a_row_also_under_an_older_command():
    table = load("table")

    def record(seed, command, hardware="CPU x2", acc="90.0", row="zskd_paper", method="zskd"):
        return {"row": row, "method": method, "impressions": "24000", "seed": seed, "hardware": hardware,
                "command": command, "test_acc": acc}

    older = [record("0", "fit A"), record("0", "fit B"), record("1", "fit B"), record("0", "fit B", "H100")]
    records = table.replace_measurement(older, record("0", "fit A --jitter 0", acc="95.0"))
    assert [(r["seed"], r["command"], r["hardware"]) for r in records] == [
        ("1", "fit B", "CPU x2"), ("0", "fit B", "H100"), ("0", "fit A --jitter 0", "CPU x2")]
    # a GPU measurement of a command stands beside the CPU one (and replaces an earlier GPU one)
    records = table.replace_measurement([record("0", "fit A"), record("0", "fit A", "NVIDIA H200")],
                                        record("0", "fit A", "NVIDIA H200", acc="96.0"))
    assert [(r["hardware"], r["test_acc"]) for r in records] == [("CPU x2", "90.0"), ("NVIDIA H200", "96.0")]
    # the ablation row measures every method at each budget: another method's point is not an older command
    ablation = [record("0", "fit zskd", row="ablation")]
    records = table.replace_measurement(ablation, record("0", "fit ci", row="ablation", method="ci"))
    assert [r["method"] for r in records] == ["zskd", "ci"]
    # a row resumed across machines ("A + B") is replaced by a later measurement on one of them, under a newer
    # command; a row on another machine is not
    resumed = [record("0", "fit A", "CPU x2 (x86_64) + CPU x2 (AMD EPYC)"), record("0", "fit A", "CPU x2 (Xeon)")]
    records = table.replace_measurement(resumed, record("0", "fit A --jitter 0", "CPU x2 (AMD EPYC)"))
    assert [(r["command"], r["hardware"]) for r in records] == [
        ("fit A", "CPU x2 (Xeon)"), ("fit A --jitter 0", "CPU x2 (AMD EPYC)")]


def fake_mnist(root: Path, monkeypatch) -> None:
    """120 training and 20 test images of noise in torchvision's MNIST layout under ``root`` (ZSKD_DATA_ROOT)."""
    generator = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 120), ("t10k", 20)):
        images = torch.randint(0, 256, (n, 28, 28), generator=generator, dtype=torch.uint8)
        write_mnist_idx(root / "MNIST" / "raw", prefix, images, torch.arange(n) % 10)
    monkeypatch.setenv("ZSKD_DATA_ROOT", str(root))


def one_epoch_mnist_teacher(tmp_path: Path, monkeypatch) -> Path:
    """Fake MNIST files under ``tmp_path / "data"`` and a LeNet-5 teacher trained one epoch on them (its path)."""
    fake_mnist(tmp_path / "data", monkeypatch)
    teacher = tmp_path / "teacher.ckpt"
    load("teacher_sources").train_teacher("no_augmentation", 0, 1, teacher)
    return teacher


def test_teacher_sources_trains_distils_and_tabulates_on_the_validation_split(tmp_path, monkeypatch):
    """Fake MNIST files: one recipe, two jitter values -> two CSV rows and their markdown table."""
    fake_mnist(tmp_path / "data", monkeypatch)
    sources = load("teacher_sources")
    results = tmp_path / "out" / "sources.csv"
    monkeypatch.chdir(tmp_path)
    sources.main(["--recipes", "shifts", "--jitter", "0", "1", "--impressions", "16", "--teacher-epochs", "1",
                  "--student-epochs", "1", "--work-dir", str(tmp_path / "work"), "--results", str(results)])
    rows = list(csv.DictReader(results.open()))
    assert [(r["recipe"], r["jitter"]) for r in rows] == [("shifts", "0"), ("shifts", "1")]
    assert all(0 <= float(r["teacher_val"]) <= 100 and 0 <= float(r["student_val"]) <= 100 for r in rows)
    assert rows[0]["teacher_val"] == rows[1]["teacher_val"]  # one teacher, two syntheses
    cache_specs = sorted((tmp_path / "work" / "shifts_t1_s0").glob("impressions_j*/spec.json"))
    assert len(cache_specs) == 2 and '"jitter": 1' in cache_specs[1].read_text()
    assert [r["cache"] for r in rows] == ["made", "made"]
    assert all(r["commit"] == COMMIT for r in rows)
    table = results.with_suffix(".md").read_text()
    assert "| shifts | 0 | 16 | 1 | 1 | 0 |" in table and "| shifts | 1 | 16 | 1 | 1 | 0 |" in table
    assert not list(tmp_path.glob("*.pt"))  # the students are measured, not exported


def test_wang_readings_distils_one_student_per_reading_on_the_validation_split(tmp_path, monkeypatch):
    """Fake MNIST files and a one-epoch teacher: both readings of R -> two CSV rows and their markdown table."""
    teacher = one_epoch_mnist_teacher(tmp_path, monkeypatch)
    readings = load("wang_readings")
    results = tmp_path / "out" / "wang.csv"
    monkeypatch.chdir(tmp_path)
    readings.main(["--impressions", "16", "--student-epochs", "1", "--teacher", str(teacher),
                   "--work-dir", str(tmp_path / "work"), "--results", str(results)])
    rows = list(csv.DictReader(results.open()))
    assert [r["reading"] for r in rows] == ["outgoing", "incoming"]
    assert all(r["commit"] == COMMIT for r in rows)
    assert all(0 <= float(r["student_val"]) <= 100 for r in rows)
    specs = {p.parent.name.rsplit("_", 1)[0]: p.read_text() for p in (tmp_path / "work").glob("*/spec.json")}
    assert '"correlation": "incoming"' in specs["incoming_s0_16"] and '"wang2021"' in specs["outgoing_s0_16"]
    table = results.with_suffix(".md").read_text()
    assert f"| outgoing | {teacher} | 16 | 1 | 0 |" in table and f"| incoming | {teacher} | 16 | 1 | 0 |" in table
    assert [r["cache"] for r in rows] == ["made", "made"]
    # the same reading at another schedule is another row, reading the first's impressions; the first stays
    readings.main(["--readings", "outgoing", "--impressions", "16", "--student-epochs", "2", "--teacher", str(teacher),
                   "--work-dir", str(tmp_path / "work"), "--results", str(results)])
    rows = list(csv.DictReader(results.open()))
    assert [(r["reading"], r["student_epochs"], r["cache"]) for r in rows] == [
        ("outgoing", "1", "made"), ("incoming", "1", "made"), ("outgoing", "2", "reused")]
    assert re.search(rf"\| outgoing \| {re.escape(str(teacher))} \| 16 \| 2 \| 0 \| [\d.]+ \| \d+\* \|",
                     results.with_suffix(".md").read_text())


def test_recipe_trials_share_a_cache_between_variants_that_synthesize_alike(tmp_path, monkeypatch):
    """Two variants with the same synthesis changes (one also augments and averages the student's weights) -> one
    cache, two rows; bad variants end in one line."""
    teacher = one_epoch_mnist_teacher(tmp_path, monkeypatch)
    trials = load("recipe_trials")
    results = tmp_path / "out" / "trials.csv"
    monkeypatch.chdir(tmp_path)
    averaged = []

    class RecordingEMA(L.pytorch.callbacks.EMAWeightAveraging):
        def on_train_end(self, trainer, pl_module):
            super().on_train_end(trainer, pl_module)
            averaged.append((self._kwargs["avg_fn"], self._latest_update_step))

    monkeypatch.setattr(L.pytorch.callbacks, "EMAWeightAveraging", RecordingEMA)
    trials.main(["--impressions", "16", "--teacher", str(teacher), "--work-dir", str(tmp_path / "work"),
                 "--results", str(results), "--variants", 'plain={"synthesizer": {"iterations": 2}, "epochs": 1}',
                 'turned={"synthesizer": {"iterations": 2}, "augmentation": {"degrees": 30}, "epochs": 1, '
                 '"ema": 0.9}'])
    rows = list(csv.DictReader(results.open()))
    assert [r["variant"] for r in rows] == ["plain", "turned"]
    assert all(r["commit"] == COMMIT for r in rows)
    (average,) = averaged  # only the second variant averaged, after every step of its one epoch
    assert average[1] >= 1 and torch.allclose(average[0](torch.zeros(1), torch.ones(1), 1), torch.tensor([0.1]))
    assert all(0 <= float(r["student_val"]) <= 100 for r in rows)
    assert json.loads(rows[1]["changes"])["augmentation"] == {"degrees": 30}
    specs = list((tmp_path / "work").glob("*/spec.json"))
    assert len(specs) == 1 and '"iterations": 2' in specs[0].read_text()
    assert [r["cache"] for r in rows] == ["made", "reused"]  # the second read the first's impressions
    report = results.with_suffix(".md").read_text()
    assert re.search(r"\| turned \|.*\| \d+\* \|", report) and not re.search(r"\| plain \|.*\*", report)
    for bad in ["noname", 'x={"epoch": 1}', "x={not json", 'x={"model": {"optimizer": 0.1}}',
                'x={"model": {"lr_scheduler": null}}', 'x={"ema": 1.0}', 'x={"ema": true}']:
        with pytest.raises(SystemExit) as stopped:  # refused by argparse, before any run could start
            trials.main(["--variants", bad, "--results", str(tmp_path / "bad.csv"), "--work-dir", str(tmp_path / "bad")])
        assert stopped.value.code == 2
    assert not (tmp_path / "bad.csv").exists() and not (tmp_path / "bad").exists()
    with pytest.raises(argparse.ArgumentTypeError, match=r"cannot set \['student'\]"):
        trials.parse_variant('x={"model": {"student": {}}}')


def test_recipe_trials_take_teacher_student_and_data_from_any_config(tmp_path, monkeypatch):
    """Without --teacher, a copy of the Wang config distils its own committed teacher; its row records the config's
    sha256 and is marked (changed) once a setting of the config changes (not a comment)."""
    fake_mnist(tmp_path / "data", monkeypatch)
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    trials = load("recipe_trials")
    results = tmp_path / "trials.csv"
    config = tmp_path / "wang.yaml"
    shutil.copy(BENCHMARKS.parent / "configs" / "mnist" / "wang_lenet5_half.yaml", config)
    monkeypatch.chdir(tmp_path)
    trials.main(["--config", str(config), "--impressions", "16", "--work-dir", str(tmp_path / "work"),
                 "--results", str(results), "--variants", 'tiny={"synthesizer": {"iterations": 2}, "epochs": 1}'])
    (row,) = csv.DictReader(results.open())
    assert row["config"] == str(config) and 0 <= float(row["student_val"]) <= 100
    assert re.fullmatch(r"[0-9a-f]{12}", row["config_sha"]) and not trials.is_stale(row)
    (spec,) = (tmp_path / "work").glob("*/spec.json")
    assert "wang2021" in spec.read_text()
    assert (spec.parent.with_name(spec.parent.name + "_run") / "impressions.png").stat().st_size > 0
    assert f"| {config} |" in results.with_suffix(".md").read_text()
    config.write_text("# a comment changes no setting\n" + config.read_text())
    assert not trials.is_stale(row)
    config.write_text(config.read_text().replace("sigma: 5.0", "sigma: 2.0"))
    trials.summarize([row], results.with_suffix(".md"))
    assert trials.is_stale(row) and f"| {config} (changed) |" in results.with_suffix(".md").read_text()
    trials.summarize([{**row, "config_sha": ""}], results.with_suffix(".md"))  # from before rows kept the sha256
    assert f"| {config} (unverified) |" in results.with_suffix(".md").read_text()


def test_recipe_trials_run_an_online_config_with_data_changes(tmp_path, monkeypatch):
    """The online baseline's config, shrunk through ``data`` changes: one row whose budget reads "online"."""
    fake_mnist(tmp_path / "data", monkeypatch)
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    trials = load("recipe_trials")
    results = tmp_path / "trials.csv"
    monkeypatch.chdir(tmp_path)
    tiny = {"data": {"buffer_size": 32, "steps_per_epoch": 2, "warmup_rounds": 1, "round_every_n_steps": 1,
                     "batch_size": 16},
            "synthesizer": {"batch_size": 16, "steps_per_round": 1, "width": 8}, "epochs": 1,
            "augmentation": {"degrees": 30}, "model": {"temperature": 4.0, "optimizer": {"lr": 0.003}}}
    built = []
    original = trials.distil_config_student.__globals__["instantiate"]

    def spying_instantiate(spec, *args, **kwargs):
        if isinstance(spec, dict) and spec.get("class_path") == "zskd_lightning.DistillationModule":
            built.append(spec["init_args"])
        return original(spec, *args, **kwargs)

    monkeypatch.setitem(trials.distil_config_student.__globals__, "instantiate", spying_instantiate)
    trials.main(["--config", str(BENCHMARKS.parent / "configs" / "mnist" / "fast_lenet5_half.yaml"),
                 "--work-dir", str(tmp_path / "work"), "--results", str(results), "--variants",
                 f"tiny={json.dumps(tiny)}"])
    (row,) = csv.DictReader(results.open())
    assert row["impressions"] == "online" and 0 <= float(row["student_val"]) <= 100
    assert json.loads(row["changes"])["data"]["buffer_size"] == 32
    (module_settings,) = built  # the model changes reach the distillation module and its optimizer
    assert module_settings["temperature"] == 4.0 and module_settings["optimizer"].keywords == {"lr": 0.003}


def test_recipe_trials_refuse_a_config_they_cannot_run_in_one_line(tmp_path):
    """A teacher's config (no synthesizer) and broken YAML each end in one line naming the file."""
    trials = load("recipe_trials")
    teacher_config = BENCHMARKS.parent / "configs" / "mnist" / "teacher_lenet5.yaml"
    with pytest.raises(SystemExit, match=r"teacher_lenet5.yaml: not a distillation config .*data.init_args.synthesizer"):
        trials.main(["--config", str(teacher_config), "--results", str(tmp_path / "trials.csv")])
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(SystemExit, match=r"broken.yaml: not valid YAML"):
        trials.main(["--config", str(broken), "--results", str(tmp_path / "trials.csv")])


def test_bn_prior_tabulates_one_student_per_weight_and_chunk_size(tmp_path):
    """A one-epoch BatchNorm digits teacher; weights 0 and 0.1 at one chunk size -> two rows and their table."""
    study = load("bn_prior")
    results = tmp_path / "out" / "bn.csv"
    study.main(["--weights", "0", "0.1", "--chunk-sizes", "8", "--teacher-epochs", "1", "--impressions", "16",
                "--iterations", "2", "--student-epochs", "1", "--work-dir", str(tmp_path / "work"),
                "--results", str(results)])
    rows = list(csv.DictReader(results.open()))
    assert [(r["weight"], r["chunk_size"]) for r in rows] == [("0", "8"), ("0.1", "8")]
    assert all(r["commit"] == COMMIT for r in rows)
    assert re.fullmatch(r"([0-9a-f]{7,}(\+local)?)?|unknown", COMMIT), COMMIT
    assert all(0 <= float(r["student_val"]) <= 100 for r in rows)
    def settings(folder: Path) -> str:  # a cache folder's name less its teacher's fingerprint
        name, tag = folder.name.rsplit("_", 1)
        assert re.fullmatch(r"[0-9a-f]{12}", tag), folder.name
        return name

    specs = {settings(p.parent): p.read_text() for p in (tmp_path / "work").glob("*/spec.json")}
    assert "BatchNormStatistics" in specs["w0.1_c8_n16_i2_t1_s0"]
    assert "BatchNormStatistics" not in specs["w0_c8_n16_i2_t1_s0"]
    assert "| 0.1 | 8 | 0 | 16 | 2 | 1 | 1 |" in results.with_suffix(".md").read_text()
    assert {settings(p.parent) for p in (tmp_path / "work").glob("*/impressions.png")} == {"w0_c8_n16_i2_t1_s0",
                                                                                         "w0.1_c8_n16_i2_t1_s0"}
    assert [r["cache"] for r in rows] == ["made", "made"]
    # another budget is another row (and cache), not a replacement of the first run's
    study.main(["--weights", "0", "--chunk-sizes", "8", "--teacher-epochs", "1", "--impressions", "8",
                "--iterations", "2", "--student-epochs", "1", "--work-dir", str(tmp_path / "work"),
                "--results", str(results)])
    rows = list(csv.DictReader(results.open()))
    assert [(r["weight"], r["impressions"]) for r in rows] == [("0", "16"), ("0.1", "16"), ("0", "8")]
    assert "w0_c8_n8_i2_t1_s0" in {settings(p.parent) for p in (tmp_path / "work").glob("*/spec.json")}


def test_priority_sampling_prints_every_path_with_its_ratio(capsys):
    load("priority_sampling").main(["--size", "1000", "--batch", "32", "--repeats", "3"])
    out = capsys.readouterr().out
    for path in ("uniform draw", "priority draw (sum tree) + weights", "priority draw + update", "torch.multinomial"):
        assert re.search(rf"{re.escape(path)}.*\s[0-9.]+\s+[0-9.]+$", out, re.MULTILINE), path
    assert "goal: a priority draw under 1 ms" in out


def test_benchmark_teacher_file_round_trip(tmp_path, cli_teacher_checkpoint):
    from zskd_lightning import FrozenTeacher

    teachers = load("teachers")
    table = tmp_path / "table.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["row", "test_acc", "training_s", "total_s", "hardware", "command"])
        writer.writeheader()
        writer.writerow({"row": "teacher", "test_acc": "91.5", "training_s": "12.5", "total_s": "13",
                         "hardware": "CPU x2", "command": "fit --config teacher.yaml"})
    record_path = teachers.write_teacher(str(cli_teacher_checkpoint), "tiny", "teacher.yaml", table, tmp_path)
    record = json.loads(record_path.read_text())
    assert (record["test_accuracy"], record["training_s"], record["recipe"]) == (91.5, 12.5, "zskd fit --config teacher.yaml")
    loaded = FrozenTeacher(checkpoint=str(tmp_path / "tiny.safetensors"), sha256=record["sha256"])
    assert loaded.fingerprint() == FrozenTeacher(checkpoint=str(cli_teacher_checkpoint)).fingerprint() == record["fingerprint"]
    with pytest.raises(SystemExit, match="no teacher row"):
        teachers.write_teacher(str(cli_teacher_checkpoint), "tiny", "other.yaml", table, tmp_path)


def test_benchmark_teacher_file_takes_only_a_teacher_row_of_todays_configs(tmp_path, cli_teacher_checkpoint):
    teachers = load("teachers")
    config = "configs/mnist/teacher_lenet5.yaml"
    today = teachers.configs_sha(teachers.DATASETS["mnist"], ["fit", "--config", config])
    table = tmp_path / "mnist.csv"  # a runner's table (by its stem): rows are told apart by configs_sha
    fields = ["row", "test_acc", "training_s", "total_s", "hardware", "command", "configs_sha"]

    def write(*rows):
        with open(table, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fields)
            writer.writeheader()
            for test_acc, sha in rows:
                writer.writerow({"row": "teacher", "test_acc": test_acc, "training_s": "10", "total_s": "11",
                                 "hardware": "CPU x2", "command": f"fit --config {config}", "configs_sha": sha})

    write(("99.1", today), ("98.0", "0123456789ab"))  # the latest row is stale: the current one counts
    record = json.loads(teachers.write_teacher(str(cli_teacher_checkpoint), "tiny", config, table, tmp_path).read_text())
    assert record["test_accuracy"] == 99.1
    write(("98.0", "0123456789ab"))
    with pytest.raises(SystemExit, match=f"measured with other configs .*0123456789ab, today's {today}"):
        teachers.write_teacher(str(cli_teacher_checkpoint), "tiny", config, table, tmp_path)


def test_table_declares_every_dataset_as_data_and_regenerates_the_committed_commands(capsys):
    table = load("table")
    for dataset in table.DATASETS.values():
        for row in dataset.rows:  # every row's configs exist
            assert all((table.ROOT / config).is_file() for config in row.configs), (dataset.name, row.name)
        plans = table.row_commands(dataset, [r.name for r in dataset.rows], [0], "fast")
        assert {plan[0] for plan in plans} == {r.name for r in dataset.rows}
        assert all(f"runs/{dataset.name}/" in " ".join(args) for *_, args in plans if len(args) > 3)
    # each measured record is a command the runner still makes: a refactor of the runner re-runs nothing
    csv_path = table.RESULTS / "mnist.csv"
    commands = {" ".join(args) for schedule in ("fast", "paper") for *_, args in table.row_commands(
        table.MNIST, [r.name for r in table.MNIST.rows] + ["ablation"], [0, 1, 2], schedule)}
    with open(csv_path, newline="") as handle:
        measured = [record["command"] for record in csv.DictReader(handle)]
    assert measured and set(measured) <= commands
    # Lopes's configs hold the authors' settings: ZSKD's paper synthesis never overrides them
    assert table.row_commands(table.MNIST, ["lopes_top", "zskd"], [0], "paper")[0][0] == "zskd_paper"
    assert len(table.row_commands(table.MNIST, ["lopes_top", "zskd"], [0], "paper")) == 1
    with pytest.raises(SystemExit):
        table.main(["--dataset", "cifar10", "--rows", "zskd_bf16", "--summarize"])
    assert "not a row of cifar10" in capsys.readouterr().err


def test_table_budget_in_impression_iterations_reads_configs_and_overrides():
    table = load("table")
    plans = {row: args for row, _, _, _, args in table.row_commands(table.MNIST, ["zskd", "fast", "ssdkd_off", "teacher"],
                                                                    [0], "fast")}
    assert table.synthesis_steps(plans["zskd"]) == 300 and table.synthesis_steps(plans["fast"]) == 5
    assert table.synthesis_steps(plans["ssdkd_off"]) == 5 and table.synthesis_steps(plans["teacher"]) is None
    paper = table.row_commands(table.MNIST, ["zskd"], [0], "paper")[0][4]
    assert table.synthesis_steps(paper) == 1500  # the paper schedule's override wins over the config


def test_table_resumes_an_interrupted_row_from_its_newest_checkpoint_and_counts_the_earlier_work(tmp_path):
    """A row killed while distilling goes on from its last epoch checkpoint when started again with the same
    command and configs; its times add the earlier run's work up to that checkpoint, nothing after it."""
    runs = load("interrupted_runs")
    run_dir, manifest = tmp_path / "runs" / "row_s0", tmp_path / "cache" / "manifest.json"
    assert runs.begin(run_dir, "fit --config a.yaml", "sha1", manifest, now=1000.0) is None  # first start

    def written(path: Path, mtime: float) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".ckpt":
            torch.save({"global_step": int(mtime)}, path)  # a zip archive, as Lightning's checkpoints are
        else:
            path.write_bytes(b"x")
        os.utime(path, (mtime, mtime))
        return path

    written(manifest, 1300.0)  # synthesis finished 300 s in; two epochs' checkpoints followed
    written(run_dir / "lightning_logs" / "version_0" / "checkpoints" / "epoch=0-step=10.ckpt", 1400.0)
    newest = written(run_dir / "lightning_logs" / "version_0" / "checkpoints" / "epoch=1-step=20.ckpt", 1500.0)
    resumed = runs.begin(run_dir, "fit --config a.yaml", "sha1", manifest, now=2000.0)  # killed at ~1550
    assert resumed == runs.Resumption(newest, wall_seconds=500.0, training_seconds=200.0)
    # killed again before its first checkpoint: the same point, the same work
    assert runs.begin(run_dir, "fit --config a.yaml", "sha1", manifest, now=3000.0) == resumed
    later = written(run_dir / "lightning_logs" / "version_2" / "checkpoints" / "epoch=2-step=30.ckpt", 3100.0)
    assert runs.begin(run_dir, "fit --config a.yaml", "sha1", manifest, now=4000.0) == runs.Resumption(
        later, wall_seconds=600.0, training_seconds=300.0)
    # a save cut off by the next kill (no zip directory at its end): the whole one before it, not the cut one
    cut = written(run_dir / "lightning_logs" / "version_2" / "checkpoints" / "epoch=3-step=40.ckpt", 4100.0)
    cut.write_bytes(cut.read_bytes()[:-30])
    os.utime(cut, (4100.0, 4100.0))
    assert runs.begin(run_dir, "fit --config a.yaml", "sha1", manifest, now=5000.0) == runs.Resumption(
        later, wall_seconds=600.0, training_seconds=300.0)
    # other configs: from scratch, and the older row's checkpoints are never picked up afterwards
    assert runs.begin(run_dir, "fit --config a.yaml", "sha2", manifest, now=5500.0) is None
    assert runs.begin(run_dir, "fit --config a.yaml", "sha2", manifest, now=6000.0) is None
    (run_dir / runs.MARKER).write_text('{"command": "fit')  # a marker cut short by the kill: from scratch
    assert runs.begin(run_dir, "fit --config a.yaml", "sha2", manifest, now=7000.0) is None
    runs.finish(run_dir)
    assert not (run_dir / runs.MARKER).exists()


def test_an_interrupted_row_keeps_every_runs_origin_and_never_resumes_on_another_kind_of_device(tmp_path, capsys):
    """The commit and hardware were read when the row finished: a row resumed on another machine, or after a
    commit, recorded only the last one (and a ¶ or ‡ mark that the older part called for was lost)."""
    runs = load("interrupted_runs")
    run_dir = tmp_path / "runs" / "row_s0"
    first = {"commit": "aaaaaaa", "hardware": "CPU x2 (x86_64)", "device": "CPU"}
    assert runs.begin(run_dir, "fit --config a.yaml", "sha1", None, now=1000.0, origin=first) is None
    checkpoint = run_dir / "epoch=0-step=10.ckpt"
    torch.save({"global_step": 10}, checkpoint)
    os.utime(checkpoint, (1100.0, 1100.0))
    second = {"commit": "bbbbbbb", "hardware": "CPU x2 (AMD EPYC)", "device": "CPU"}
    resumed = runs.begin(run_dir, "fit --config a.yaml", "sha1", None, now=2000.0, origin=second)
    assert resumed.checkpoint == checkpoint and resumed.origins == (first,)
    gpu = {"commit": "bbbbbbb", "hardware": "NVIDIA H200", "device": "NVIDIA H200"}
    assert runs.begin(run_dir, "fit --config a.yaml", "sha1", None, now=3000.0, origin=gpu) is None
    assert "ran on CPU, this one on NVIDIA H200: starting afresh" in capsys.readouterr().out
    assert runs.begin(run_dir, "fit --config a.yaml", "sha1", None, now=4000.0, origin=gpu) is None  # 1100 < 3000
    # a marker written before origins were kept: which machines ran the row is unknown, so it starts afresh
    torch.save({"global_step": 20}, checkpoint)
    os.utime(checkpoint, (4100.0, 4100.0))
    marker = json.loads((run_dir / runs.MARKER).read_text())
    del marker["origins"]
    (run_dir / runs.MARKER).write_text(json.dumps(marker))
    assert runs.begin(run_dir, "fit --config a.yaml", "sha1", None, now=5000.0, origin=gpu) is None
    assert "recorded no machine or commit: starting afresh" in capsys.readouterr().out


def test_a_row_resumed_on_another_machine_records_both_and_the_oldest_commit(tmp_path, monkeypatch):
    table = offline_table(tmp_path, monkeypatch)
    first = {"commit": "aaaaaaa", "hardware": "CPU x2 (x86_64)", "device": "CPU"}
    resumption = table.Resumption(tmp_path / "epoch=0-step=10.ckpt", 100.0, 100.0, (first,))
    monkeypatch.setattr(table.interrupted_runs, "begin", lambda *args, **kwargs: resumption)
    monkeypatch.setattr(table, "run_row", lambda args, resume=None, online=False: {
        "test_acc": 99.0, "teacher_acc": 99.2, "synthesis_s": 0.0, "total_s": 200.0, "training_s": 200.0})
    monkeypatch.setattr(table, "hardware", lambda: "CPU x2 (AMD EPYC)")
    monkeypatch.setattr(table, "code_commit", lambda: "bbbbbbb")
    table.main(["--dataset", "mnist", "--rows", "student_ce", "--seeds", "0"])
    [record] = table.read_csv(tmp_path / "results" / "mnist.csv")
    assert (record["hardware"], record["commit"]) == ("CPU x2 (x86_64) + CPU x2 (AMD EPYC)", "aaaaaaa")


def test_table_measures_on_a_gpu_the_rows_a_cpu_measured_and_keeps_both(tmp_path, monkeypatch, capsys):
    """A device run of rows measured on a CPU skipped every row, printed nothing and exited 0."""
    table = offline_table(tmp_path, monkeypatch)
    args = table.row_commands(table.MNIST, ["student_ce"], [0], "fast")[0][4]
    cpu = {field: "" for field in table.FIELDS} | {
        "row": "student_ce", "method": "ce-real", "impressions": "0", "seed": "0", "command": " ".join(args),
        "configs_sha": table.row_fingerprint(table.MNIST, "student_ce", args), "hardware": "CPU x2 (AMD EPYC)"}
    path = tmp_path / "results" / "mnist.csv"
    path.parent.mkdir()
    table.write_csv_atomic(path, [cpu], table.FIELDS)
    measured = []

    def run_row(args, resume=None, online=False):
        measured.append(args)
        return {"test_acc": 99.0, "teacher_acc": 99.2, "synthesis_s": 0.0, "total_s": 1.0, "training_s": 1.0}

    monkeypatch.setattr(table, "run_row", run_row)
    monkeypatch.setattr(table, "hardware", lambda: "CPU x2 (AMD EPYC)")
    table.main(["--dataset", "mnist", "--rows", "student_ce", "--seeds", "0"])
    assert not measured and "student_ce seed 0: measured with these configs on CPU" in capsys.readouterr().out
    monkeypatch.setattr(table, "hardware", lambda: "NVIDIA H200")
    table.main(["--dataset", "mnist", "--rows", "student_ce", "--seeds", "0"])
    assert len(measured) == 1
    assert [r["hardware"] for r in table.read_csv(path)] == ["CPU x2 (AMD EPYC)", "NVIDIA H200"]


def test_table_reads_the_test_table_plain_or_drawn_by_rich():
    table = load("table")
    plain = "      Test metric             DataLoader 0\n        test/acc            0.9750000238418579\n"
    drawn = ("\u2503        Test metric        \u2503       DataLoader 0        \u2503\n"
             "\u2502         test/acc          \u2502    0.9750000238418579     \u2502\n"
             "\u2502      test/agreement       \u2502    0.9800000190734863     \u2502\n")
    assert table.printed_test_metrics(plain) == {"test/acc": "0.9750000238418579"}
    assert table.printed_test_metrics(drawn) == {"test/acc": "0.9750000238418579", "test/agreement": "0.9800000190734863"}


def test_table_row_resumed_loads_the_checkpoint_and_adds_the_earlier_times(tmp_path, monkeypatch):
    table = load("table")
    monkeypatch.setattr(table, "ROOT", tmp_path)
    args = table.row_commands(table.MNIST, ["zskd"], [0], "fast")[0][4]
    assert table.row_run_dir(args) == tmp_path / args[args.index("--trainer.default_root_dir") + 1]
    manifest = table.cache_manifest(args)
    manifest.parent.mkdir(parents=True)
    manifest.write_text('{"wall_seconds": 300.0}')  # finished by the interrupted run
    commands = []

    def fake_zskd(command, cwd, run_dir):
        commands.append(command)
        return subprocess.CompletedProcess(command, 0, "test/acc 0.975\n", "")

    monkeypatch.setattr(table, "run_watched", fake_zskd)
    checkpoint = tmp_path / "epoch=1-step=20.ckpt"
    result = table.run_row(args, table.Resumption(checkpoint, wall_seconds=500.0, training_seconds=200.0))
    assert commands[0][-2:] == ["--ckpt_path", str(checkpoint)]
    assert result["synthesis_s"] == 300.0
    assert result["total_s"] >= 500.0 and result["training_s"] == result["total_s"] - 300.0


@pytest.mark.parametrize("pair", ["mnist", "cifar10"])
def test_distillation_step_prints_the_teachers_paths_beside_the_students_step(pair, capsys):
    load("distillation_step").main(["--pair", pair, "--batch", "2", "--repeats", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("batch 2 of ")
    figures = [line for line in lines[1:] if re.search(r" ms +[0-9.]+x the teacher forward", line)]
    assert len(figures) == 4 and any(" 1.00x the " in line for line in figures)


def test_wang_targets_prints_each_sigmas_draws_beside_the_real_images(monkeypatch, capsys):
    script = load("wang_targets")
    real = torch.randn(64, 10, generator=torch.Generator().manual_seed(0)) * 6  # stands in for the validation split
    monkeypatch.setattr(script, "real_logits", lambda teacher, data: real)
    script.main(["--dataset", "mnist", "--sigmas", "1.5", "8", "--draws", "2000"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("Gaussian", "real"))]
    assert [line.split()[0] for line in rows] == ["Gaussian", "Gaussian", "real"]
    spreads = [float(line.split()[-3]) for line in rows]
    assert spreads[1] > spreads[0]  # the head is linear in the features: the logits spread grows with sigma
    assert abs(spreads[2] - real.std(dim=1).mean().item()) < 0.01


def offline_table(root: Path, monkeypatch):
    """The table runner working in ``root``: the shipped configs copied there (rows' fingerprints read them), a
    stand-in MNIST teacher file, results under ``root/results``, no report drawn."""
    table = load("table")
    monkeypatch.setattr(table, "ROOT", root)
    monkeypatch.setattr(table, "RESULTS", root / "results")
    monkeypatch.setattr(table, "summarize", lambda dataset, records: None)
    shutil.copytree(BENCHMARKS.parent / "configs", root / "configs")
    (root / table.MNIST.teacher_file).parent.mkdir(parents=True)
    (root / table.MNIST.teacher_file).write_bytes(b"teacher")
    return table


def test_table_writes_each_row_into_the_csv_as_it_is_then(tmp_path, monkeypatch):
    """A row deleted from the CSV while the runner measures another (to have it measured again) stays deleted: each
    finished row is written into the file as it is at that moment, not into the copy read at the start."""
    table = offline_table(tmp_path, monkeypatch)
    path = tmp_path / "results" / "mnist.csv"
    path.parent.mkdir()
    old = {field: "" for field in table.FIELDS} | {"row": "student_kd", "command": "fit --config old.yaml"}
    table.write_csv_atomic(path, [old], table.FIELDS)

    def measure_while_the_old_row_is_deleted(args, resume=None, online=False):
        table.write_csv_atomic(path, [], table.FIELDS)
        return {"test_acc": 99.0, "teacher_acc": 99.2, "synthesis_s": 0.0, "total_s": 1.0, "training_s": 1.0}

    monkeypatch.setattr(table, "run_row", measure_while_the_old_row_is_deleted)
    table.main(["--dataset", "mnist", "--rows", "student_ce", "--seeds", "0"])
    assert [r["row"] for r in table.read_csv(path)] == ["student_ce"]
