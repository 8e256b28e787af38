"""ImpressionDataModule: serves cached impressions of a frozen teacher as training data."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from zskd_lightning.augment import augment_normalized
from zskd_lightning.errors import InvalidArgument, ZSKDError
from zskd_lightning.pixels import from_pixels, to_pixels
from zskd_lightning.synthesis.base import Synthesizer
from zskd_lightning.synthesis.cache import ImpressionCache
from zskd_lightning.teacher import FrozenTeacher, as_frozen_teacher


class ImpressionDataset(Dataset):
    """Impressions ``[start, stop)`` of a complete cache; items ``(input [C, H, W], target [...])`` (float32).

    Shards are memory-mapped (opened lazily, once per process), never copied whole. ``transform`` maps a
    pixel-space image (values in [0, 1]) to an augmented one when ``input_range`` is known, else it is applied
    to the raw input.
    """

    def __init__(
        self,
        cache: ImpressionCache,
        start: int,
        stop: int,
        transform: Callable[[Tensor], Tensor] | None = None,
        input_range: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        self.cache, self.start, self.stop = cache, start, stop
        self.transform, self.input_range = transform, input_range
        self._chunks: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.stop - self.start

    def _chunk(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        if chunk not in self._chunks:
            self._chunks[chunk] = (
                np.load(self.cache.chunk_file(chunk, "inputs"), mmap_mode="r"),
                np.load(self.cache.chunk_file(chunk, "targets"), mmap_mode="r"),
            )
        return self._chunks[chunk]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        chunk, offset = divmod(self.start + index, self.cache.chunk_size)
        inputs, targets = self._chunk(chunk)
        x = torch.from_numpy(np.array(inputs[offset]))
        if self.transform is not None:
            x = from_pixels(self.transform(to_pixels(x, self.input_range)), self.input_range)
        return x, torch.from_numpy(np.array(targets[offset]))

    def __getstate__(self) -> dict:  # memory maps are reopened in each worker process
        return {**self.__dict__, "_chunks": {}}


class ImpressionDataModule(L.LightningDataModule):
    """Training data synthesized from a frozen teacher, cached on disk; real data only for evaluation.

    The :class:`~zskd_lightning.ImpressionSynthesis` callback fills the cache at fit start on every device
    (``zskd fit`` adds it); this module then serves impressions ``[0, num_impressions)`` for training and the
    next ``num_val_impressions`` for validation (metric: student-teacher agreement). The test split comes
    from ``eval_data`` (e.g. the real MNIST test set); no real training data is ever read.

    Args:
        synthesizer: how impressions are made (e.g. :class:`~zskd_lightning.ZSKDSynthesizer`).
        num_impressions: training impressions (ZSKD MNIST: 24,000).
        cache_dir: the cache folder; a matching complete cache is reused, a mismatching one is an error.
        teacher: the frozen teacher; ``None`` takes the LightningModule's ``teacher`` attribute.
        input_shape: ``(C, H, W)`` of the teacher's inputs; default: ``eval_data.input_shape``.
        input_mean / input_std: per-channel normalization of the teacher's inputs; impressions are kept in the
            valid range ``[(0 - mean) / std, (1 - mean) / std]``. Default: ``eval_data``'s.
        eval_data: a labelled DataModule whose TEST split evaluates the student.
        num_val_impressions: held-out impressions for validation (0: no validation loop).
        chunk_size: impressions per chunk (the unit of work, of random state and of files).
        seed: the cache's seed; chunk ``c`` draws its targets and noise from ``(seed, c)``.
        augmentation: per-sample transform on pixel-space training images (``torchvision.transforms.v2``),
            applied in the dataset (CPU, ~1 ms per image).
        batch_augmentation: a module applied to whole pixel-space training batches on their device, e.g.
            :class:`~zskd_lightning.augment.BatchAugmentation` (per-sample random, vectorised: far cheaper).
        overwrite_cache: replace a mismatching cache instead of stopping with an error.
    """

    def __init__(
        self,
        synthesizer: Synthesizer,
        num_impressions: int,
        cache_dir: str,
        teacher: nn.Module | None = None,
        input_shape: Sequence[int] | None = None,
        input_mean: Sequence[float] | None = None,
        input_std: Sequence[float] | None = None,
        eval_data: L.LightningDataModule | None = None,
        num_val_impressions: int = 0,
        chunk_size: int = 256,
        seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        augmentation: Callable[[Tensor], Tensor] | None = None,
        batch_augmentation: nn.Module | None = None,
        overwrite_cache: bool = False,
    ) -> None:
        super().__init__()
        if num_impressions < 1:
            raise InvalidArgument(f"num_impressions must be >= 1, got {num_impressions}")
        self.synthesizer = synthesizer
        self.num_impressions = num_impressions
        self.num_val_impressions = num_val_impressions
        self.cache_dir = os.fspath(cache_dir)
        self.teacher = teacher
        self.eval_data = eval_data
        self.chunk_size = chunk_size
        self.seed = seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.augmentation = augmentation
        self.batch_augmentation = batch_augmentation
        self.overwrite_cache = overwrite_cache
        self.input_shape = tuple(input_shape) if input_shape else tuple(getattr(eval_data, "input_shape", ()) or ())
        if not self.input_shape:
            raise ZSKDError("ImpressionDataModule needs input_shape (C, H, W) or an eval_data that defines it")
        mean = input_mean if input_mean is not None else getattr(eval_data, "mean", None)
        std = input_std if input_std is not None else getattr(eval_data, "std", None)
        self._normalization = None if mean is None or std is None else (tuple(mean), tuple(std))
        if self._normalization and not len(self._normalization[0]) == len(self._normalization[1]) == self.input_shape[0]:
            raise ZSKDError(
                f"input_mean/input_std need one value per channel: {self.input_shape[0]} channels, "
                f"got {len(self._normalization[0])} and {len(self._normalization[1])}"
            )
        self._cache: ImpressionCache | None = None

    # ------------------------------------------------------------------------------ used by synthesis
    def input_range(self) -> tuple[Tensor, Tensor] | None:
        """Per-channel valid ``(min, max)`` of the teacher's inputs, each ``[C, 1, 1]``; ``None`` if unknown."""
        if self._normalization is None:
            return None
        mean = torch.tensor(self._normalization[0]).view(-1, 1, 1)
        std = torch.tensor(self._normalization[1]).view(-1, 1, 1)
        return (0 - mean) / std, (1 - mean) / std

    def resolve_teacher(self, pl_module: L.LightningModule | None = None) -> FrozenTeacher:
        """The frozen teacher to synthesize from, on ``pl_module``'s device."""
        teacher = self.teacher if self.teacher is not None else getattr(pl_module, "teacher", None)
        if teacher is None:
            raise ZSKDError("no teacher: give ImpressionDataModule a teacher, or use a module with a `teacher`")
        teacher = as_frozen_teacher(teacher)
        return teacher.to(pl_module.device) if pl_module is not None else teacher

    def build_cache(self, teacher: FrozenTeacher) -> ImpressionCache:
        """The cache this configuration and ``teacher`` define (nothing is read or written yet)."""
        input_range = self.input_range()
        spec = {
            "synthesizer": self.synthesizer.settings(),
            "teacher_fingerprint": teacher.fingerprint(),
            "num_classes": teacher.num_classes,
            "input_shape": list(self.input_shape),
            "input_range": None if input_range is None else [input_range[0].flatten().tolist(), input_range[1].flatten().tolist()],
            "dtype": "float32",
            "num_impressions": self.num_impressions + self.num_val_impressions,
            "num_train_impressions": self.num_impressions,
            "chunk_size": self.chunk_size,
            "seed": self.seed,
        }
        return ImpressionCache(self.cache_dir, spec)

    def use_cache(self, cache: ImpressionCache) -> None:
        """Serve from ``cache`` (complete); called by the synthesis callback on every rank."""
        self._cache = cache

    # ------------------------------------------------------------------------------------ LightningDataModule
    def setup(self, stage: str) -> None:
        if stage in ("test", "predict") and self.eval_data is not None:
            self.eval_data.setup("test")
        if self._normalization is None and stage == "fit":
            rank_zero_warn("ImpressionDataModule has no input_mean/input_std: impressions are not range-limited")

    def _require_cache(self) -> ImpressionCache:
        if self._cache is None:
            raise ZSKDError(
                f"the impressions in {self.cache_dir} have not been synthesized in this run: add "
                "zskd_lightning.ImpressionSynthesis() to the Trainer's callbacks (the zskd CLI does this)"
            )
        return self._cache

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Apply ``batch_augmentation`` to training batches, on their device."""
        if self.batch_augmentation is not None and self.trainer is not None and self.trainer.training:
            inputs, targets = batch
            batch = (augment_normalized(inputs, self.batch_augmentation, self.input_range()), targets)
        return batch

    def train_dataloader(self) -> DataLoader:
        cache = self._require_cache()
        dataset = ImpressionDataset(cache, 0, self.num_impressions, self.augmentation, self.input_range())
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=len(dataset) > self.batch_size,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.num_val_impressions == 0:
            return []
        cache = self._require_cache()
        dataset = ImpressionDataset(cache, self.num_impressions, self.num_impressions + self.num_val_impressions)
        return DataLoader(dataset, batch_size=self.eval_batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        if self.eval_data is None:
            raise ZSKDError("testing needs eval_data (a labelled DataModule whose test split evaluates the student)")
        return self.eval_data.test_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
