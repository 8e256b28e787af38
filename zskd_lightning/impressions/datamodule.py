"""ImpressionDataModule: serves cached impressions of a frozen teacher as training data."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from zskd_lightning.data.epoch_order import epoch_keyed_loader, process_share
from zskd_lightning.data.evaluation import evaluation_loader
from zskd_lightning.data.synthetic import SyntheticDataModule
from zskd_lightning.errors import InvalidArgument, ZSKDError
from zskd_lightning.impressions.cache import ImpressionCache
from zskd_lightning.impressions.driver import ImpressionPlan, ImpressionSynthesis
from zskd_lightning.impressions.shards import ShardReader
from zskd_lightning.pixels import InputRange, from_pixels, to_pixels
from zskd_lightning.synthesis import Synthesizer


class ImpressionDataset(Dataset):
    """Impressions ``[start, stop)`` of a complete cache; items ``(input [C, H, W], target [...])`` (float32).

    Shards are read row by row (:class:`~zskd_lightning.impressions.shards.ShardReader`: memory-mapped while a
    process maps few, read at their offset beyond that), never copied whole. ``transform`` maps a
    pixel-space image (values in [0, 1]) to an augmented one when ``input_range`` is known, else it is applied
    to the raw input.
    """

    def __init__(
        self,
        cache: ImpressionCache,
        start: int,
        stop: int,
        transform: Callable[[Tensor], Tensor] | None = None,
        input_range: InputRange | None = None,
    ) -> None:
        self.cache, self.start, self.stop = cache, start, stop
        self.transform, self.input_range = transform, input_range
        self.shards = ShardReader()  # pickled without its maps: each loader worker opens its own

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        chunk, offset = divmod(self.start + index, self.cache.chunk_size)
        x = torch.from_numpy(self.shards.row(self.cache.chunk_file(chunk, "inputs"), offset))
        if self.transform is not None:
            x = from_pixels(self.transform(to_pixels(x, self.input_range)), self.input_range)
        return x, torch.from_numpy(self.shards.row(self.cache.chunk_file(chunk, "targets"), offset))


class ImpressionDataModule(SyntheticDataModule):
    """Training data synthesized from a frozen teacher, cached on disk; real data only for evaluation.

    The impressions are made from the LightningModule's ``teacher`` (one teacher: the one that distils) by the
    :class:`~zskd_lightning.ImpressionSynthesis` callback at fit start, on every device. This datamodule asks for
    that callback itself (:meth:`synthesis_callbacks`, which ``DistillationModule.configure_callbacks``
    returns), so ``zskd fit`` and a plain ``lightning.Trainer`` behave the same. It then serves impressions
    ``[0, num_impressions)`` for training and the next ``num_val_impressions`` for validation (metric:
    student-teacher agreement). The test split comes from ``eval_data`` (e.g. the real MNIST test set); no real
    training data is ever read.

    Args:
        synthesizer: how impressions are made (e.g. :class:`~zskd_lightning.ZSKDSynthesizer`).
        num_impressions: training impressions (ZSKD MNIST: 24,000). Not part of the cache's identity: with a
            larger budget the cache gains the missing chunks, with a smaller one it serves a prefix.
        cache_dir: the cache folder; a matching complete cache is reused, a mismatching one is an error.
        input_shape, input_mean, input_std, eval_data, predict_data, validate_on_real: the teacher's input space
            and the real data that evaluates the student, see :class:`~zskd_lightning.data.SyntheticDataModule`.
        num_val_impressions: held-out impressions for validation (0: no validation loop, unless
            ``validate_on_real``).
        chunk_size: impressions per chunk (the unit of work, of random state and of files).
        seed: the cache's seed; chunk ``c`` draws its targets and noise from ``(seed, c)``.
        augmentation: per-sample transform on pixel-space training images (``torchvision.transforms.v2``),
            applied in the dataset (CPU, ~1 ms per image), drawing from a stream keyed by ``(fit seed, epoch,
            index)``. The training order is shuffled by ``(fit seed, epoch)``
            (:mod:`zskd_lightning.data.epoch_order`): a fit resumed at an epoch's end or in its middle reads
            what an unstopped one would.
        batch_augmentation: see :class:`~zskd_lightning.data.SyntheticDataModule`.
        overwrite_cache: replace a mismatching cache instead of stopping with an error.
    """

    def __init__(
        self,
        synthesizer: Synthesizer,
        num_impressions: int,
        cache_dir: str,
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
        predict_data: L.LightningDataModule | None = None,
        validate_on_real: bool = False,
    ) -> None:
        super().__init__(input_shape, input_mean, input_std, eval_data, predict_data, validate_on_real,
                         batch_augmentation)
        if num_impressions < 1:
            raise InvalidArgument(f"num_impressions must be >= 1, got {num_impressions}")
        if num_val_impressions < 0:
            raise InvalidArgument(f"num_val_impressions must be >= 0, got {num_val_impressions}")
        for name, value, least in (("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1),
                                   ("chunk_size", chunk_size, 1), ("num_workers", num_workers, 0), ("seed", seed, 0)):
            if value < least:
                raise InvalidArgument(f"{name} must be >= {least}, got {value}")
        self.synthesizer = synthesizer
        self.num_impressions = num_impressions
        self.num_val_impressions = num_val_impressions
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.augmentation = augmentation
        #: What to synthesize and where (cache folder, chunk size, seed, overwrite): kept here only.
        self.impression_plan = ImpressionPlan(
            synthesizer=synthesizer,
            input_spec=self.input_spec,
            cache_dir=os.fspath(cache_dir),
            num_train=num_impressions,
            num_val=num_val_impressions,
            chunk_size=chunk_size,
            seed=seed,
            overwrite=overwrite_cache,
        )
        self._cache: ImpressionCache | None = None
        self._synthesis: ImpressionSynthesis | None = None  # this fit's synthesis callback, once set up

    def synthesis_callbacks(self) -> list[Callback]:
        """The callbacks this data needs in the Trainer: the one that fills the cache at fit start."""
        return [ImpressionSynthesis()]

    def use_cache(self, cache: ImpressionCache) -> None:
        """Serve from ``cache`` (complete); called by the synthesis callback on every rank."""
        self._cache = cache

    def filled_by(self, synthesis: ImpressionSynthesis) -> None:
        """The synthesis callback of this fit (it registers at setup): a callback that runs before it and asks
        for training data (Lightning's ``BatchSizeFinder``, ``LearningRateFinder``) has it fill the cache then."""
        self._synthesis = synthesis

    def _require_cache(self) -> ImpressionCache:
        trainer = self.trainer
        if self._cache is None and self._synthesis is not None and trainer is not None and trainer.state.fn == "fit":
            self._synthesis.fill(trainer, trainer.lightning_module)
        if self._cache is None:
            raise ZSKDError(
                f"the impressions in {self.impression_plan.cache_dir} have not been synthesized in this run: add "
                "zskd_lightning.ImpressionSynthesis() to the Trainer's callbacks, or distil with a DistillationModule "
                "(it adds the callback itself; a subclass overriding configure_callbacks must call super())"
            )
        return self._cache

    def train_dataloader(self) -> DataLoader:
        cache = self._require_cache()
        dataset = ImpressionDataset(cache, 0, self.num_impressions, self.augmentation, self.input_range())
        share = -(-len(dataset) // process_share(self.trainer)[1])  # this process's impressions an epoch
        return epoch_keyed_loader(
            dataset,
            seed=self.training_streams.run_seed(),
            trainer=self.trainer,
            batch_size=self.batch_size,
            random_items=self.augmentation is not None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=share > self.batch_size,  # a partial last batch, unless it would be the only one
        )

    def _has_validation(self) -> bool:
        return self.num_val_impressions > 0 or super()._has_validation()

    def val_dataloader(self) -> list[DataLoader]:
        """``[held-out impressions]`` (when any), then ``[eval_data's validation split]`` with ``validate_on_real``."""
        loaders = []
        if self.num_val_impressions > 0:
            cache = self._require_cache()
            dataset = ImpressionDataset(cache, self.num_impressions, self.num_impressions + self.num_val_impressions)
            loaders.append(evaluation_loader(dataset, trainer=self.trainer, batch_size=self.eval_batch_size,
                                             num_workers=self.num_workers))
        return loaders + self.real_val_loaders()
