"""Shared fixtures: tiny YAML configs and a tiny teacher checkpoint made by the real ``zskd`` CLI (CPU, seconds)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml

DIGITS_HALF = "zskd_lightning.models.DigitsConvNetHalf"


def tiny_classifier_config(root: Path | str, network: str = DIGITS_HALF, **trainer: Any) -> dict[str, Any]:
    """A ``zskd fit`` config: ClassifierModule(``network``) on digits, one short epoch, last.ckpt saved."""
    trainer_cfg: dict[str, Any] = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "devices": 1,
        "limit_train_batches": 3,
        "limit_val_batches": 2,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(root),
        "callbacks": [
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"save_last": True, "save_top_k": 0},
            }
        ],
    }
    trainer_cfg.update(trainer)
    return {
        "seed_everything": 0,
        "trainer": trainer_cfg,
        "model": {
            "class_path": "zskd_lightning.ClassifierModule",
            "init_args": {"network": {"class_path": network, "init_args": {"in_channels": 1, "num_classes": 10}}},
        },
        "data": {"class_path": "zskd_lightning.data.DigitsDataModule", "init_args": {"batch_size": 32}},
    }


@pytest.fixture(scope="module")
def torch_single_thread():
    """One intra-op thread for the module: the tiny test models run fastest that way, and two threads on a
    busy 2-core machine are up to ten times slower (OpenMP contention)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def classifier_config() -> Callable[..., dict[str, Any]]:
    """The :func:`tiny_classifier_config` factory, as a fixture."""
    return tiny_classifier_config


@pytest.fixture
def write_yaml(tmp_path: Path) -> Callable[..., Path]:
    """``write_yaml(config_dict_or_text, name="config.yaml") -> path`` in ``tmp_path``."""

    def _write(config: dict[str, Any] | str, name: str = "config.yaml") -> Path:
        path = tmp_path / name
        path.write_text(config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False))
        return path

    return _write


@pytest.fixture(scope="session")
def cli_teacher_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``last.ckpt`` of a 1-epoch ClassifierModule(DigitsConvNetHalf) run of ``zskd fit`` (in-process).

    Made through the real CLI, so its ``hyper_parameters["network"]`` records the architecture.
    """
    from zskd_lightning.cli import main

    root = tmp_path_factory.mktemp("cli_teacher")
    config = root / "teacher.yaml"
    config.write_text(yaml.safe_dump(tiny_classifier_config(root, logger=False)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sys, "argv", ["zskd"])  # pytest's own arguments are not the CLI's
            patch.delenv("PL_GLOBAL_SEED", raising=False)  # seed_everything exports it: do not leak it
            main(["fit", "--config", str(config)])
    finally:
        torch.set_num_threads(threads)
    checkpoints = sorted(root.rglob("last*.ckpt"))
    assert checkpoints, f"zskd fit wrote no last.ckpt under {root}"
    return checkpoints[0]
