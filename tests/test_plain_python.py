"""The README's plain-Python example (examples/plain_lightning.py) runs end to end with a tiny budget."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from helpers import tiny

EXAMPLE = tiny.REPO / "examples" / "plain_lightning.py"


@pytest.fixture
def example(monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # seed_everything exports it; restored after the test
    spec = importlib.util.spec_from_file_location("plain_lightning_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_lightning_example_runs(example, tmp_path, capsys):
    out = tmp_path / "run"
    # One torch thread: these tensors are tiny, and on a busy 2-core machine two threads are ~10x slower.
    with tiny.torch_threads(1):
        results = example.main(["--impressions", "400", "--iterations", "30", "--epochs", "10",
                                 "--teacher-epochs", "3", "--out", str(out)])

    manifest = json.loads((out / "impressions" / "manifest.json").read_text())
    assert manifest["num_impressions"] == 400 and manifest["method"]["args"]["iterations"] == 30
    assert len(manifest["shards"]) == 2
    assert (out / "student.safetensors").is_file()

    printed = re.search(r"student test accuracy: ([\d.]+)\s+teacher: ([\d.]+)", capsys.readouterr().out)
    assert printed, "the example should print the student's and the teacher's test accuracy"
    student, teacher = float(printed.group(1)), float(printed.group(2))
    assert student == pytest.approx(results["test/acc"], abs=1e-3)
    assert teacher == pytest.approx(results["test/teacher_acc"], abs=1e-3)
    assert teacher > 0.9  # 3 epochs on real digits
    assert student > 0.2  # chance is 0.1; this budget gives 0.57-0.81 over seeds 0-3 (0.97 with the defaults)


def test_plain_lightning_example_is_documented(example):
    text = Path(EXAMPLE).read_text()
    assert 'if __name__ == "__main__":' in text
    for option in ("--impressions", "--iterations", "--epochs", "--out"):
        assert option in text
    assert "zskd_lightning.cli" not in text and ".yaml" not in text  # plain Python: no CLI, no YAML
    assert "ImpressionSynthesis" not in text  # the data asks for its synthesis callback itself
    assert "examples/plain_lightning.py" in (tiny.REPO / "README.md").read_text()  # the README points to it
