"""Recording the metadata: the teacher's owner runs the frozen teacher once over its real training data (Lopes,
Fenu and Starner 2017, arXiv 1710.07535), grouping activations by the TRUE class.

:class:`ActivationRecorder` is a LightningModule: ``trainer.validate(recorder, dataloaders=train_loader)`` (or
``zskd record --config FILE.yaml``, which does exactly that with the datamodule's training split) feeds every
batch through the teacher in eval mode, with no augmentation, and accumulates per class and layer. Under DDP each
rank accumulates its share (``zskd record`` gives each sample to one rank; a plain loader given to
``trainer.validate`` is sharded by Lightning, which may repeat a few samples to even out the ranks); at the end the
ranks' moments are gathered and merged in rank order, and global rank 0 writes the file.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from zskd_lightning.checks import check_trainer_precision
from zskd_lightning.errors import InvalidArgument, RankSharedError
from zskd_lightning.metadata.file import LOGITS, write_metadata
from zskd_lightning.metadata.statistics import ClassMoments
from zskd_lightning.ranks import raise_together
from zskd_lightning.taps import FeatureTaps, Tap, submodule
from zskd_lightning.teacher import as_frozen_teacher

def default_layers(network: nn.Module) -> list[str]:
    """Every ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Linear``, in registration order. Their outputs as the taps hold
    them after the forward: an in-place activation right after a layer (``nn.ReLU(inplace=True)``, as in every
    shipped model) overwrites that tensor, so those layers record activated values; out-of-place, pre-activation.
    A module named ``logits`` is left out: the logits (divided by the temperature) are recorded under that name."""
    return [name for name, m in network.named_modules()
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) and name and name != LOGITS]


class ActivationRecorder(L.LightningModule):
    """Accumulate the teacher's per-class activation statistics over the data it is validated on, then write them.

    Args:
        teacher: the trained classifier (frozen here; in eval mode throughout).
        output: the metadata file to write (safetensors; see :mod:`zskd_lightning.metadata.file`).
        layers: module paths in the teacher's network whose outputs are recorded (default:
            :func:`default_layers`), in forward order: the file keeps this order, and Lopes' spectral objectives
            chain the layers in it (equal-width layers given out of order would chain the wrong weights); the
            logits divided by ``temperature`` are always recorded too, as ``"logits"``.
        temperature: what the logits are divided by (the authors': 8).
        max_full_dim: layers wider than this keep per-unit variances, not a full covariance.
    """

    def __init__(self, teacher: nn.Module, output: str = "metadata.safetensors", layers: Sequence[str] | None = None,
                 temperature: float = 8.0, max_full_dim: int = 512) -> None:
        super().__init__()
        if not 0 < temperature < math.inf or max_full_dim < 1:
            raise InvalidArgument(f"temperature must be > 0 and max_full_dim >= 1, got {temperature}, {max_full_dim}")
        self.teacher = as_frozen_teacher(teacher)
        network = self.teacher.network
        self.layers = list(layers) if layers is not None else default_layers(network)
        for name in self.layers:
            submodule(network, name)  # one line naming the path if the teacher lacks it
        if LOGITS in self.layers:
            raise InvalidArgument(f"layer {LOGITS!r} of {type(network).__name__} cannot be recorded under its name: "
                                  f"{LOGITS!r} is where the logits / temperature are kept; record the layers around it")
        self.output, self.temperature, self.max_full_dim = output, float(temperature), int(max_full_dim)
        self.moments: dict[str, ClassMoments] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._started = 0.0
        self._recorded = False  # this run's statistics reached the file (every rank knows)
        self._problem: str | None = None  # this rank's first bad batch: raised at the epoch's end, on every rank

    def setup(self, stage: str) -> None:
        """Refuse a Trainer precision that would cast the teacher (its weights and fingerprint must stay the ones
        synthesis loads); ``-mixed`` precisions are fine: the teacher records in float32 (autocast off)."""
        check_trainer_precision(self.trainer.precision, "recording")
        self._recorded = False  # a run that failed after the statistics were taken (Lightning skips its teardown)

    def on_validation_epoch_start(self) -> None:
        self.moments, self.shapes, self._started = {}, {}, time.perf_counter()
        self._problem = None

    def teardown(self, stage: str) -> None:
        """A run that gave no batch at all (``limit_val_batches: 0``, an empty split: Lightning then skips the
        whole loop) ends in one line instead of exiting cleanly without a file."""
        recorded, self._recorded = self._recorded, False  # a later run of this recorder reports its own
        if stage == "validate" and not recorded:  # every rank alike (the loop is skipped on all): printed once
            raise RankSharedError(f"nothing was recorded into {self.output}: the data gave no batch (an empty "
                                  "split, or the Trainer's limit_val_batches 0)")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Add a batch's statistics. A bad batch (no int labels, labels out of range, a layer that gave no
        activation, activations of another size than the first batch's) is kept as this rank's problem and the rest
        of its batches skipped; the epoch's end raises it (a batch's labels differ between ranks, and a rank raising
        alone would leave the others in the gather)."""
        if self._problem is None:
            self._problem = self._record(*batch)

    def _record(self, x: Tensor, y: Tensor) -> str | None:
        if y.ndim != 1 or y.is_floating_point():
            return "recording needs labelled data: batches of (inputs, int class labels [B])"
        taps = FeatureTaps(self.teacher.network, [Tap(name) for name in self.layers])
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False), taps:  # float32 statistics
            logits = self.teacher(x)
        classes = logits.shape[1]
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= classes):
            return (f"recording needs class labels in [0, {classes}) for a teacher with {classes} outputs; "
                    f"a batch holds labels {int(y.min())} to {int(y.max())}")
        silent = [name for name in self.layers if Tap(name).key not in taps.features]
        if silent:
            return (f"layer(s) {', '.join(silent)} of {type(self.teacher.network).__name__} produced no "
                    "activation in the forward pass (a module called through its weights, or a branch that "
                    "runs only in training): leave them out of the recorder's `layers`")
        features = {**{name: taps.features[Tap(name).key] for name in self.layers}, LOGITS: logits / self.temperature}
        changed = [f"{name} {list(value.shape[1:])} (first {list(self.shapes[name])})" for name, value in
                   features.items() if name in self.shapes and value[0].numel() != self.moments[name].dim]
        if changed:
            return (f"a batch gave activations of another size than the first batch: {', '.join(changed)}; record "
                    "the teacher at one input shape")
        for name, value in features.items():
            if name not in self.moments:
                dim = value[0].numel()
                kept = "full" if dim <= self.max_full_dim else "diagonal"
                self.moments[name] = ClassMoments(logits.shape[1], dim, kept)
                self.shapes[name] = tuple(value.shape[1:])
            self.moments[name].update(value, y)
        return None

    def on_validation_epoch_end(self) -> None:
        trainer = self.trainer
        raise_together(trainer.strategy, self._problem,
                       lambda: "recording stopped: another rank's batches were unusable (that rank's error says why)")
        self._recorded = True
        if trainer.world_size > 1:
            gathered: list = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, {k: _state(m) for k, m in self.moments.items()})
            for name, moments in self.moments.items():
                merged = _from_state(gathered[0][name])
                for other in gathered[1:]:
                    merged.merge(_from_state(other[name]))
                self.moments[name] = merged
        size, failure = 0, None
        if trainer.is_global_zero:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(self.output)), exist_ok=True)
                size = write_metadata(self.output, self.moments, self.shapes, self.teacher.fingerprint(),
                                      self.temperature)
            except Exception as err:  # every rank stops with it: the others' exit status must not say success
                failure = err
        raise_together(trainer.strategy, failure,
                       lambda: f"recording not written: rank 0 could not write {self.output} (its error says why)")
        if trainer.is_global_zero:
            count = int(next(iter(self.moments.values())).count.sum())
            kept = ", ".join(f"{name} {list(self.shapes[name])} {m.kept}" for name, m in self.moments.items())
            rank_zero_info(f"Recorded {count} samples in {time.perf_counter() - self._started:.1f} s into "
                           f"{self.output} ({size / 2**20:.1f} MiB): {kept}")


def _state(moments: ClassMoments) -> dict:
    return {"kept": moments.kept, "count": moments.count, "mean": moments.mean, "m2": moments.m2}


def _from_state(state: dict) -> ClassMoments:
    moments = ClassMoments(state["mean"].shape[0], state["mean"].shape[1], state["kept"])
    moments.count, moments.mean, moments.m2 = state["count"].clone(), state["mean"].clone(), state["m2"].clone()
    return moments
