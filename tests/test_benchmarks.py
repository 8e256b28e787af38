"""The benchmark scripts run end to end at a tiny size (their figures are only meaningful at full size)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

from helpers.tiny import one_torch_thread  # noqa: F401  (module-wide autouse fixture)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_synthesis_throughput_prints_every_path_with_its_ratio(capsys):
    throughput = load("synthesis_throughput")
    throughput.main(["--impressions", "8", "--iterations", "2", "--chunk", "4", "--plain-batch", "4", "--repeats", "2",
                     "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith(("lenet5", "alexnet")) and "finished" not in line]
    assert len(rows) == 2 * 3  # per model: plain loop, library 32-true, library bf16-mixed
    for row in rows:
        ips, ratio = (float(v) for v in re.findall(r"\s(\d+(?:\.\d+)?)", row)[-3:-1])
        assert ips > 0 and ratio > 0
    assert sum("plain loop" in row for row in rows) == 2
    assert sum("library (bf16-mixed)" in row for row in rows) == 2
    schedule = [line for line in lines if "finished impressions/s" in line]
    assert len(schedule) == 2  # LeNet-5 only, one per library precision
    assert f"the fast config's {throughput.fast_config_iterations()}" in schedule[0]
    assert float(schedule[0].rsplit("ratio", 1)[1]) > 0
