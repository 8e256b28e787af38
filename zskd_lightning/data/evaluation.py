"""Evaluation loaders that read every sample exactly once across DDP ranks.

Lightning shards a plain validation or test loader with ``DistributedSampler``, which pads every rank's share to
the same length by repeating samples: with ``N`` samples on ``W`` ranks, ``W * ceil(N / W) - N`` samples are
counted twice, so a DDP run reports another accuracy than one process on the same network.
:func:`evaluation_loader` gives each rank the strided share ``dataset[rank::W]`` instead (Lightning's
``UnrepeatedDistributedSampler``, which Lightning leaves in place). Shares differ by at most one sample, so ranks
may run one batch more or fewer: this library's modules have no collective per evaluation batch (a module of yours
that has one, ``self.log(..., on_step=True, sync_dist=True)`` in ``validation_step``, needs loaders padded as
Lightning pads them). The metrics (torchmetrics means, logged per epoch, losses too) gather sums and counts, so the
epoch's figure is the mean over the ``N`` samples exactly. Lightning's own ``sync_dist`` mean would not be: it
averages the ranks' sample counts as an integer tensor, which truncates when they differ.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from zskd_lightning.data.epoch_order import process_share

__all__ = ["EvaluationData", "ValidationSwitch", "evaluation_loader", "own_generator"]


def own_generator() -> torch.Generator:
    """A CPU generator for a loader that needs none of its own draws (in-order, or batches made elsewhere): each
    new iterator of a ``DataLoader`` draws a (worker) base seed from its ``generator``, by default from the global
    CPU stream; with its own, evaluating, predicting and new replay iterators leave that stream, hence a resumed
    fit's dropout and augmentation draws, where they were."""
    return torch.Generator().manual_seed(0)


def evaluation_loader(dataset: Dataset, *, trainer, batch_size: int, **loader_args) -> DataLoader:
    """An in-order loader over this process's share of ``dataset`` (:func:`~zskd_lightning.data.epoch_order.
    process_share`): all of it on one process, ``dataset[rank::world_size]`` under DDP. Made in the process that
    reads it (a ``*_dataloader`` hook: a loader made before a spawning launcher starts the ranks would carry rank
    0's share to every rank). Padded as Lightning would pad it (each rank the same count) where unpadded shares
    could fail: a strategy other than DDP (FSDP, DeepSpeed: their forward passes are collectives, so every rank
    must run as many), a dataset with fewer samples than ranks (a rank without a batch could not join the
    metrics' gathering; with a warning), and a Trainer that evaluates a fraction of its loaders
    (``limit_val_batches`` or ``limit_test_batches`` a float under 1: Lightning takes the fraction of each rank's
    own batch count, which could round to none on one rank only). ``loader_args`` go to ``DataLoader``."""
    rank, world_size = process_share(trainer)
    sampler = None
    if world_size > 1:
        fractional = any(isinstance(limit, float) and 0.0 < limit < 1.0
                         for limit in (getattr(trainer, "limit_val_batches", 1.0),
                                       getattr(trainer, "limit_test_batches", 1.0)))
        strategy = getattr(trainer, "strategy", None)
        lockstep = strategy is not None and (not isinstance(strategy, DDPStrategy)
                                             or isinstance(strategy, DeepSpeedStrategy))
        if len(dataset) == 0 or (len(dataset) >= world_size and not fractional and not lockstep):
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        else:
            if len(dataset) < world_size:
                warnings.warn(f"an evaluation set of {len(dataset)} samples on {world_size} ranks: samples are "
                              "repeated so that every rank has one", stacklevel=2)
            sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
    loader_args.setdefault("generator", own_generator())
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, **loader_args)


class EvaluationData(L.LightningDataModule):
    """``dataset`` served in order as the validation set (``trainer.validate(module, datamodule=...)``): under DDP
    each sample on one rank, the loader made in each rank's process (:func:`evaluation_loader`), batched by
    ``collate_fn`` (``None``: torch's default)."""

    def __init__(self, dataset: Dataset, batch_size: int, num_workers: int = 0,
                 collate_fn: Callable[[list[Any]], Any] | None = None) -> None:
        super().__init__()
        self.dataset, self.batch_size, self.num_workers, self.collate_fn = dataset, batch_size, num_workers, collate_fn

    def val_dataloader(self) -> DataLoader:
        return evaluation_loader(self.dataset, trainer=self.trainer, batch_size=self.batch_size,
                                 num_workers=self.num_workers, collate_fn=self.collate_fn)


class ValidationSwitch:
    """Mixin of a LightningDataModule with nothing to validate on in some fits (no held-out data): there,
    :meth:`_no_validation_this_fit` (from ``setup("fit")``) sets the Trainer's ``limit_val_batches`` to 0 (no
    validation loop rather than an empty one; ``ReduceLROnPlateau`` is then refused in one line at
    ``configure_optimizers``), and ``teardown("fit")`` (or ``on_exception``) puts the Trainer's own value back, so
    a later ``trainer.validate`` or ``fit`` on the same Trainer validates as its settings say."""

    _limit_val_batches: int | float | None = None  # the Trainer's, while a fit without validation runs

    def _no_validation_this_fit(self) -> None:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            self._limit_val_batches = trainer.limit_val_batches
            trainer.limit_val_batches = 0

    def _restore_validation(self) -> None:
        trainer = getattr(self, "trainer", None)
        if self._limit_val_batches is not None and trainer is not None:
            trainer.limit_val_batches, self._limit_val_batches = self._limit_val_batches, None

    def teardown(self, stage: str) -> None:
        if stage == "fit":
            self._restore_validation()
        super().teardown(stage)

    def on_exception(self, exception: BaseException) -> None:
        """A failed fit gets no ``teardown``: the Trainer's setting is put back here."""
        self._restore_validation()
        super().on_exception(exception)
