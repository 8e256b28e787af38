"""Tiny teachers, students and cache utilities shared by the synthesis / cache / DDP tests.

Importable from the tests (``from helpers import tiny``: pytest puts ``tests/`` on ``sys.path``) and from the
standalone scripts in this folder (which put ``tests/`` on ``sys.path`` themselves).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from zskd_lightning import FrozenTeacher, ImpressionDataModule, ZSKDSynthesizer
from zskd_lightning.data.digits import DigitsDataModule
from zskd_lightning.models import DigitsConvNet

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SHIPPED_TEACHER = REPO / "zskd_lightning" / "assets" / "digits_teacher.pt"

DIGITS_MEAN, DIGITS_STD = DigitsDataModule.mean, DigitsDataModule.std
INPUT_SHAPE = (1, 8, 8)
ARRAYS = ("inputs", "targets", "labels")


def digits_input_range() -> tuple[torch.Tensor, torch.Tensor]:
    """The valid range ``[C, 1, 1]`` of normalized digits inputs (black, white)."""
    mean = torch.tensor(DIGITS_MEAN).view(-1, 1, 1)
    std = torch.tensor(DIGITS_STD).view(-1, 1, 1)
    return (0 - mean) / std, (1 - mean) / std


class TinyNet(nn.Module):
    """conv3x3(width) [-> BN] -> ReLU -> maxpool2 -> FC 32 -> ReLU -> FC 10, on ``[B, 1, 8, 8]``."""

    input_size = (8, 8)

    def __init__(self, width: int = 8, batch_norm: bool = False, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, width, 3, padding=1)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(width))
        layers += [nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(width * 16, 32), nn.ReLU(),
                   nn.Linear(32, num_classes)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def make_net(seed: int = 0, **kwargs) -> TinyNet:
    """A TinyNet with a fixed-seed random init (same weights in every process; global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyNet(**kwargs)


def make_bn_teacher(seed: int = 0) -> TinyNet:
    """A TinyNet with BatchNorm whose running statistics come from real digits (a few train-mode passes)."""
    from zskd_lightning.data.digits import _fixed_split

    net = make_net(seed, batch_norm=True)
    images, _, train_idx, _ = _fixed_split()
    x = (torch.from_numpy(images[train_idx]).unsqueeze(1) - DIGITS_MEAN[0]) / DIGITS_STD[0]
    net.train()
    with torch.no_grad():
        for start in range(0, 512, 128):
            net(x[start : start + 128])
    return net.eval()


def shipped_teacher() -> FrozenTeacher:
    """The package's trained digits teacher (DigitsConvNet, ~97% test accuracy): a fixed, trained model."""
    return FrozenTeacher(DigitsConvNet(in_channels=1, num_classes=10), str(SHIPPED_TEACHER))


def make_datamodule(cache_dir: str | os.PathLike, teacher: nn.Module | None = None, *, num_impressions: int = 32,
                    chunk_size: int = 8, iterations: int = 3, seed: int = 0, lr: float = 0.05,
                    **kwargs) -> ImpressionDataModule:
    """An ImpressionDataModule for the digits input space (no eval data: nothing real is read)."""
    return ImpressionDataModule(
        synthesizer=kwargs.pop("synthesizer", None) or ZSKDSynthesizer(iterations=iterations, lr=lr),
        num_impressions=num_impressions,
        cache_dir=os.fspath(cache_dir),
        teacher=teacher if teacher is not None else make_net(0),
        input_shape=INPUT_SHAPE,
        input_mean=DIGITS_MEAN,
        input_std=DIGITS_STD,
        chunk_size=chunk_size,
        seed=seed,
        batch_size=16,
        **kwargs,
    )


def sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def shard_digests(cache_dir: str | os.PathLike) -> dict[str, str]:
    """sha256 of every ``chunk-*.npy`` shard, by file name (what must be identical between equivalent runs)."""
    return {p.name: sha256(p) for p in sorted(Path(cache_dir).glob("chunk-*.npy"))}


def manifest_shards(cache_dir: str | os.PathLike) -> list[dict]:
    """The manifest's shard list without the run-dependent fields (seconds, loss)."""
    manifest = json.loads((Path(cache_dir) / "manifest.json").read_text())
    return [{k: s[k] for k in ("chunk", "count", "sha256")} for s in manifest["shards"]]
