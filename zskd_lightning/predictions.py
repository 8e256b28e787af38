"""Writing what ``trainer.predict`` / ``zskd predict`` computes: a Lightning prediction writer.

Each rank writes ``predictions.npz`` (``predictions.rank<R>.npz`` when there are several) into the run's log
folder: ``probabilities`` float32 ``[N, num_classes]``, ``labels`` int64 ``[N]`` (their argmax),
``indices`` int64 ``[N]`` (each row's index in its prediction dataset; under DDP Lightning gives each rank an
unrepeated share, so the ranks' files together hold every row once; a rank may hold one row fewer) and
``dataloader_idx`` int64 ``[N]`` (which of several predict loaders the row came from; 0 with one). A dataset
without sampler indices (an iterable one) gets positions in order (per loader) on one process, and ``-1`` under
DDP, where it shards itself.
"""

from __future__ import annotations

import io
import os
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from zskd_lightning.files import write_atomic


class PredictionWriter(BasePredictionWriter):
    """Collect every predict batch's output (probabilities ``[B, K]``) and write them when the epoch ends.

    Args:
        filename: the file's name in the run's log folder (the Trainer's ``log_dir``, else its
            ``default_root_dir``); under DDP rank R writes ``<stem>.rankR<extension>``.
    """

    def __init__(self, filename: str = "predictions.npz") -> None:
        super().__init__(write_interval="batch")
        self.filename = filename
        self._outputs: list[torch.Tensor] = []
        self._indices: list[torch.Tensor] = []
        self._loaders: list[torch.Tensor] = []
        self.written: str | None = None

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._outputs, self._indices, self._loaders = [], [], []
        self.written = None  # a rank with nothing to write this time must not report the last predict's file

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        probabilities = prediction.detach().float().cpu()
        self._outputs.append(probabilities)
        indices = torch.as_tensor(batch_indices if batch_indices is not None else [], dtype=torch.int64)
        if len(indices) != len(probabilities):  # no sampler indices (an iterable dataset)
            if trainer.world_size > 1:  # the dataset shards itself: which rows this rank got is unknown
                indices = torch.full((len(probabilities),), -1, dtype=torch.int64)
            else:  # one process reads it in order: positions
                start = sum(int((loader == dataloader_idx).sum()) for loader in self._loaders)
                indices = torch.arange(start, start + len(probabilities))
        self._indices.append(indices)
        # Lightning sets these only for loaders it can index and never clears them: a later batch of an iterable
        # loader would be handed this batch's
        loop = getattr(trainer, "predict_loop", None)
        if loop is not None:
            loop.current_batch_indices = []
        self._loaders.append(torch.full((len(probabilities),), dataloader_idx, dtype=torch.int64))

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank asks, even one
        if not self._outputs:  # with nothing to write (fewer inputs than processes)
            return
        probabilities = torch.cat(self._outputs).numpy()
        stem, extension = os.path.splitext(self.filename)
        name = self.filename if trainer.world_size == 1 else f"{stem}.rank{trainer.global_rank}{extension}"
        path = os.path.join(folder, name)
        os.makedirs(folder, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, probabilities=probabilities, labels=probabilities.argmax(axis=1).astype(np.int64),
                 indices=torch.cat(self._indices).numpy(), dataloader_idx=torch.cat(self._loaders).numpy())
        write_atomic(path, lambda handle: handle.write(buffer.getvalue()))
        self.written = path
        if trainer.world_size == 1:
            rank_zero_info(f"Predictions for {len(probabilities)} inputs written to {path}")
        else:
            rank_zero_info(f"Predictions written by each of {trainer.world_size} ranks to its own file, "
                           f"{os.path.join(folder, f'{stem}.rank*{extension}')} (rank 0: {len(probabilities)} inputs)")


def writer_unless_present(trainer: L.Trainer | None) -> list[PredictionWriter]:
    """``[PredictionWriter()]`` unless the Trainer already has a prediction writer (for ``configure_callbacks``)."""
    present = trainer is not None and any(isinstance(c, BasePredictionWriter) for c in trainer.callbacks)
    return [] if present else [PredictionWriter()]
