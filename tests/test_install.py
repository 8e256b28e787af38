"""The README's quickstart from a plain (non-editable) install, run from a folder outside the repository: the
shipped config and teacher resolve from the installed package, not from the checkout."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny

ROOT = Path(__file__).resolve().parents[1]
TINY_BUDGET = ["--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
               "--data.init_args.num_impressions", "40", "--data.init_args.num_val_impressions", "8",
               "--data.init_args.chunk_size", "16", "--data.init_args.synthesizer.init_args.iterations", "3"]


def _setuptools_major() -> int:
    """The installed setuptools' major version (0 when there is none); pyproject.toml needs >= 77."""
    try:
        return int(importlib.metadata.version("setuptools").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return 0


def test_the_quickstart_runs_from_a_non_editable_install(tmp_path):
    """``pip install --target`` (a regular, non-editable install of this checkout) into a folder put first on
    ``PYTHONPATH``, so its copy is the one imported. Built with the setuptools already here when it is recent
    enough for ``pyproject.toml`` (offline; skipped otherwise: an isolated build would download one)."""
    if _setuptools_major() < 77:  # pip would fetch a newer one for an isolated build: no network in tests
        pytest.skip("needs setuptools >= 77 installed (pyproject.toml's build requirement) to build offline")
    target = tmp_path / "installed"
    build = ["--no-build-isolation", "--no-index"]
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *build,
                              "--target", str(target), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    env = {**tiny.script_env(1), "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import zskd_lightning; print(zskd_lightning.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert where.stdout.strip().startswith(str(target)), where.stdout + where.stderr  # the installed copy
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    result = subprocess.run([str(target / "bin" / "zskd"), "fit", "--config", "zskd_lightning:configs/quickstart.yaml", *TINY_BUDGET],
                            cwd=run_dir, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/acc" in result.stdout
    assert list((run_dir / "runs" / "quickstart" / "lightning_logs").glob("version_*/student.safetensors"))
