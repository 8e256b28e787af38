"""Tiny teachers, students and cache utilities shared by the synthesis / cache / DDP tests.

Importable from the tests (``from helpers import tiny``: pytest puts ``tests/`` on ``sys.path``) and from the
standalone scripts in this folder (which put ``tests/`` on ``sys.path`` themselves).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from torch import nn

import lightning as L

from zskd_lightning import (
    DistillationModule,
    FastSynthesizer,
    FrozenTeacher,
    ImpressionDataModule,
    ImpressionSynthesis,
    OnlineDataModule,
    ZSKDSynthesizer,
)
from zskd_lightning.data.digits import DigitsDataModule
from zskd_lightning.models import DigitsConvNet

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SHIPPED_TEACHER = REPO / "zskd_lightning" / "assets" / "digits_teacher.pt"

DIGITS_MEAN, DIGITS_STD = DigitsDataModule.mean, DigitsDataModule.std
INPUT_SHAPE = (1, 8, 8)
ARRAYS = ("inputs", "targets", "labels")


def write_mnist_idx(raw: Path, prefix: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Write ``images [N, H, W]`` (uint8 values) and ``labels [N]`` as torchvision's MNIST idx files in ``raw``."""
    raw.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    with open(raw / f"{prefix}-images-idx3-ubyte", "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, h, w))
        f.write(images.to(torch.uint8).numpy().tobytes())
    with open(raw / f"{prefix}-labels-idx1-ubyte", "wb") as f:
        f.write(struct.pack(">II", 2049, n))
        f.write(labels.to(torch.uint8).numpy().tobytes())


def digits_input_range() -> tuple[torch.Tensor, torch.Tensor]:
    """The valid range ``[C, 1, 1]`` of normalized digits inputs (black, white)."""
    mean = torch.tensor(DIGITS_MEAN).view(-1, 1, 1)
    std = torch.tensor(DIGITS_STD).view(-1, 1, 1)
    return (0 - mean) / std, (1 - mean) / std


class ViewNet(nn.Module):
    """``[N, in_channels, 8, 8]`` -> 10 logits, flattening its conv features with ``.view``, which a channels-last
    tensor cannot take (as networks written for row-major inputs do)."""

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(in_channels, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        features = self.conv(x)
        return self.head(features.view(len(features), -1))


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


def make_datamodule(cache_dir: str | os.PathLike, *, num_impressions: int = 64,
                    chunk_size: int = 8, iterations: int = 5, seed: int = 0, lr: float = 0.05,
                    batch_size: int = 16, **kwargs) -> ImpressionDataModule:
    """An ImpressionDataModule for the digits input space (no eval data: nothing real is read).

    Defaults (8 chunks of 8 impressions, 5 iterations; with :func:`run_synthesis`'s teacher ``make_net(0)``) are
    the "standard tiny cache" that the subprocess script and the in-process runs share, so their caches can be
    compared byte for byte. The teacher is the LightningModule's (one teacher).
    """
    return ImpressionDataModule(
        synthesizer=kwargs.pop("synthesizer", None) or ZSKDSynthesizer(iterations=iterations, lr=lr),
        num_impressions=num_impressions,
        cache_dir=os.fspath(cache_dir),
        input_shape=INPUT_SHAPE,
        input_mean=DIGITS_MEAN,
        input_std=DIGITS_STD,
        chunk_size=chunk_size,
        seed=seed,
        batch_size=batch_size,
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


def online_setup(*, steps_per_epoch: int = 8, buffer_size: int = 48, round_size: int = 16, warmup_rounds: int = 2,
                 teacher: nn.Module | None = None, synthesizer: type = FastSynthesizer, sampler=None,
                 buffer_update: str = "ring", draws_per_round: int = 0, **synthesizer_settings) -> tuple[DistillationModule, OnlineDataModule]:
    """A tiny online run in the digits input space: teacher ``make_net(0)``, student ``make_net(1, width=4)``, a
    width-4 generator (``synthesizer`` class) making ``round_size`` inputs a round (1 step) into a
    ``buffer_size`` buffer, a round every 2 training steps, batches of 8. Nothing real is read."""
    settings = dict(batch_size=round_size, steps_per_round=1, width=4, noise_dim=8, **synthesizer_settings)
    datamodule = OnlineDataModule(synthesizer(**settings), buffer_size=buffer_size, steps_per_epoch=steps_per_epoch,
                                  batch_size=8, warmup_rounds=warmup_rounds, round_every_n_steps=2, sampler=sampler,
                                  buffer_update=buffer_update, draws_per_round=draws_per_round,
                                  input_shape=INPUT_SHAPE, input_mean=DIGITS_MEAN,
                                  input_std=DIGITS_STD)
    model = DistillationModule(teacher=teacher if teacher is not None else make_net(0),
                               student=make_net(1, width=4), export_filename=None)
    return model, datamodule


def zskd_command() -> list[str]:
    """The ``zskd`` console script of the Python running the tests (its environment's ``bin``), else
    ``python -m zskd_lightning``: never another installation's ``zskd`` found earlier on ``PATH``."""
    script = shutil.which("zskd", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "zskd_lightning"]


def quiet_trainer(root: str | os.PathLike, **overrides) -> L.Trainer:
    """A one-epoch CPU Trainer with no logger, checkpoints, progress bar, summary or sanity check."""
    settings = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=os.fspath(root),
    )
    return L.Trainer(**{**settings, **overrides})


def run_synthesis(cache_dir: str | os.PathLike, *, devices: int = 1, fit: bool = False, grid: bool = True,
                  root: str | os.PathLike | None = None, teacher: nn.Module | None = None,
                  precision: str = "32-true", export_filename: str | None = None,
                  **datamodule_kwargs) -> tuple[L.Trainer, ImpressionDataModule]:
    """The real path: ``Trainer.fit(DistillationModule, ImpressionDataModule)``; the ImpressionSynthesis callback
    is given by hand only to turn the picture off (``grid=False``), else the module asks for it itself.
    ``fit=False`` stops after synthesis (``limit_train_batches=0``, like ``zskd synthesize``)."""
    teacher = teacher if teacher is not None else make_net(0)
    datamodule = make_datamodule(cache_dir, **datamodule_kwargs)
    model = DistillationModule(teacher=teacher, student=make_net(1, width=4), export_filename=export_filename)
    trainer = quiet_trainer(
        os.fspath(root) if root is not None else os.path.dirname(os.path.abspath(cache_dir)),
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        precision=precision,
        limit_train_batches=None if fit else 0,
        callbacks=[] if grid else [ImpressionSynthesis(grid_filename=None)],
    )
    trainer.fit(model, datamodule=datamodule)
    return trainer, datamodule


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Import into a test module to run it on one torch thread: these tensors are tiny, and one thread is as
    fast on an idle machine and ~10x faster on a busy one. (Results do not depend on the thread count: see
    test_ddp_synthesis.py.)"""
    with torch_threads(1):
        yield


SCRIPT = HERE / "synthesize_run.py"


def script_env(threads: int | None) -> dict[str, str]:
    """Environment for a script run: ``OMP_NUM_THREADS=threads``, or none at all (library defaults)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "PL_GLOBAL_SEED")}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_script(args: Sequence[str], *, timeout: float, threads: int | None = None,
               settle: float = 10.0) -> subprocess.CompletedProcess:
    """Run ``synthesize_run.py args`` in its own process group; returns a CompletedProcess with
    ``returncode`` (``None`` if it had to be killed after ``timeout`` seconds). Whatever is left of the group
    (e.g. a DDP rank) gets ``settle`` seconds to end after the main process, then SIGKILL: nothing outlives it."""
    command = [sys.executable, str(SCRIPT), *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=script_env(threads))
    try:
        out, err = proc.communicate(timeout=timeout)
        returncode: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        out, err = proc.communicate()
        returncode = None
    deadline = time.monotonic() + settle
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    _kill_group(proc.pid)
    return subprocess.CompletedProcess(command, returncode, out, err)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def read_rank_log(path: str | os.PathLike) -> list[tuple[int, str, str]]:
    """Lines ``rank what detail`` written by the script (``what`` = a chunk index, or ``ERROR``)."""
    if not Path(path).exists():
        return []
    rows = []
    for line in Path(path).read_text().splitlines():
        rank, what, detail = line.split(" ", 2)
        rows.append((int(rank), what, detail))
    return rows
