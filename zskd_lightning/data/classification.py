"""Shared base class for labelled image-classification data modules.

Every concrete module (digits, MNIST, Fashion-MNIST, CIFAR-10) loads each split ONCE into memory as
one tensor, converts and normalizes it in bulk with tensor ops, and serves items
``(image: float32 [C, H, W], label: int64 scalar)`` from an in-memory dataset. Only training batches,
and only with ``augment=True``, are augmented: per sample, vectorised over the batch on its device
(:class:`~zskd_lightning.augment.BatchAugmentation`, in pixel space where 0 is black).

Served values are ``(pixel01 - mean) / std`` per channel, so :meth:`ClassificationDataModule.input_range`
gives the exact box the served (and any synthetic) inputs live in.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Callable

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset

from zskd_lightning.augment import BatchAugmentation, augment_normalized
from zskd_lightning.batch_progress import fetched_batch, redone_batch
from zskd_lightning.data.epoch_order import epoch_keyed_loader, process_share
from zskd_lightning.data.evaluation import ValidationSwitch, evaluation_loader, own_generator
from zskd_lightning.errors import InvalidArgument, ZSKDError
from zskd_lightning.pixels import valid_range
from zskd_lightning.randomness import TrainingStreams, seeded_streams

__all__ = ["ClassificationDataModule", "InMemoryImageDataset", "DATA_ROOT_ENV"]

#: Environment variable that supplies the default data root when ``root`` is not given.
DATA_ROOT_ENV = "ZSKD_DATA_ROOT"


class InMemoryImageDataset(Dataset):
    """Images and labels held in memory as tensors.

    Args:
        images: ``[N, C, H, W]`` tensor (float32 already normalized when ``transform`` is None;
            otherwise whatever ``transform`` expects, e.g. uint8 pixels).
        labels: ``[N]`` int64 tensor.
        transform: optional per-sample callable applied to ``images[i]``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if images.ndim != 4:
            raise InvalidArgument(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise InvalidArgument(f"labels must be [N] with N={images.shape[0]}, got shape {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.transform = transform

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]


def draws_per_item(dataset: Dataset) -> bool:
    """Whether reading an item of ``dataset`` may draw random numbers, so that a keyed training loader must
    seed each item: ``False`` only for this module's own :class:`InMemoryImageDataset` without a transform; any
    other dataset (a subclass's, a ``Subset``, one drawing in ``__getitem__`` rather than a ``.transform``) is
    taken to draw (reseeding an item that does not costs about 7 microseconds on a 2-core CPU)."""
    return not (type(dataset) is InMemoryImageDataset and dataset.transform is None)


class ClassificationDataModule(ValidationSwitch, L.LightningDataModule):
    """Base ``LightningDataModule`` for real labelled images (teachers, real-data baselines, evaluation).

    Subclasses set the class attributes ``num_classes``, ``mean``, ``std``, ``input_shape`` (or override
    it as a property) and implement :meth:`_load_official` (and optionally :meth:`_augmentation`).

    Splits: ``setup("fit")`` and ``setup("validate")`` load the official TRAINING set once and split it
    into train / val with ``torch.Generator().manual_seed(seed)`` + ``randperm`` (``val_fraction`` of it,
    rounded, goes to val); ``setup("test")`` and ``setup("predict")`` load the official TEST set, which is
    used for nothing else. ``setup(None)`` loads everything.

    Args:
        root: data directory; default: the ``ZSKD_DATA_ROOT`` environment variable, else ``./data``.
        batch_size: training batch size.
        eval_batch_size: batch size of the val / test / predict loaders; default: ``batch_size``.
        num_workers: DataLoader workers (``persistent_workers`` is on only when this is > 0).
        val_fraction: fraction of the official training set held out for validation, in ``[0, 1)``.
        seed: seeds the train / val split only. The training order and augmentation draw from the fit's seed
            (``seed_everything``'s), keyed by epoch and batch, not from the global stream: a fit resumed at an
            epoch's end or in its middle reads and augments what an unstopped one would
            (:mod:`zskd_lightning.data.epoch_order`, :class:`~zskd_lightning.randomness.TrainingStreams`).
        augment: per-sample augmentation of the training split (never of val / test): ``True`` for the
            dataset's default, or a :class:`~zskd_lightning.augment.BatchAugmentation` of your own.
        download: allow downloading missing files (modules whose data ships locally ignore it).
        mean / std: per-channel normalization of pixel values in [0, 1] (default: the class's, e.g. MNIST's
            0.1307 / 0.3081); give your teacher's if it was trained with others.
    """

    #: number of classes.
    num_classes: int = 10
    #: per-channel mean / std of pixel values in [0, 1]; served = (pixel01 - mean) / std.
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    #: short name used in messages and logs.
    name: str = "classification"

    def __init__(
        self,
        *,
        root: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        augment: bool | BatchAugmentation = False,
        download: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if int(batch_size) < 1:
            raise InvalidArgument(f"batch_size must be >= 1, got {batch_size}")
        if eval_batch_size is not None and int(eval_batch_size) < 1:
            raise InvalidArgument(f"eval_batch_size must be >= 1, got {eval_batch_size}")
        if int(num_workers) < 0:
            raise InvalidArgument(f"num_workers must be >= 0, got {num_workers}")
        if not 0.0 <= float(val_fraction) < 1.0:
            raise InvalidArgument(f"val_fraction must be in [0, 1), got {val_fraction}")
        if root is None:
            root = os.environ.get(DATA_ROOT_ENV) or "./data"
        self.root: str = os.path.expanduser(str(root))
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size) if eval_batch_size is not None else self.batch_size
        self.num_workers = int(num_workers)
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        if isinstance(augment, BatchAugmentation) and augment.mix > 0:
            raise ZSKDError(f"augment: mix={augment.mix} blends images but not their labels; use it only for "
                            "impressions the teacher re-labels (ImpressionDataModule.batch_augmentation)")
        self.augment = augment if isinstance(augment, BatchAugmentation) else bool(augment)
        self.download = bool(download)
        if (mean is None) != (std is None):
            raise InvalidArgument("mean and std go together: give both or neither")
        if mean is not None:
            channels = len(type(self).mean)
            if len(mean) != channels or len(std) != channels or any(s <= 0 for s in std):
                raise InvalidArgument(f"{type(self).__name__} needs {channels} mean and {channels} std value(s) "
                                      f"(std > 0), got mean {list(mean)}, std {list(std)}")
            if any(not 0.0 <= m <= 1.0 for m in mean) or any(s > 1.0 for s in std):  # images are read in [0, 1]
                raise InvalidArgument(f"{type(self).__name__}: mean and std are of pixel values in [0, 1], got mean "
                                      f"{list(mean)}, std {list(std)}: divide 0-255 statistics by 255")
            self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.train_dataset: InMemoryImageDataset | None = None
        self.val_dataset: InMemoryImageDataset | None = None
        self.test_dataset: InMemoryImageDataset | None = None
        self.training_streams = TrainingStreams()  # keys of the training order and augmentation; in checkpoints

    # ------------------------------------------------------------------ subclass hooks
    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the served images."""
        raise NotImplementedError

    def _load_official(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the official training (``train=True``) or test split as ``(images, labels)``.

        ``images``: ``[N, C, H, W]`` in the served geometry, either uint8 pixels (0..255) or float in
        [0, 1]; ``labels``: ``[N]`` int64.
        """
        raise NotImplementedError

    def _augmentation(self) -> BatchAugmentation | None:
        """Per-sample random augmentation of a pixel-space batch (black = 0), or None."""
        return None

    # ------------------------------------------------------------------ normalization
    def _stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        return mean, std

    def input_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``(min, max)`` of served values, each ``[C, 1, 1]``.

        ``min = (0 - mean) / std`` (black), ``max = (1 - mean) / std`` (white).
        """
        return valid_range(self.mean, self.std)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Map uint8 pixels (0..255) or float pixels in [0, 1] (``[..., C, H, W]``) to served float32."""
        x = pixels.to(torch.float32)
        if pixels.dtype == torch.uint8:
            x = x / 255.0
        mean, std = self._stats()
        return (x - mean) / std

    def denormalize(self, served: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize`: served values back to pixels in [0, 1] (not clamped)."""
        mean, std = self._stats()
        return served.to(torch.float32) * std.to(served.device) + mean.to(served.device)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Augment training batches on their device (vectorised, per-sample random), only with ``augment=True``."""
        trainer = self.trainer
        if self.augment and trainer is not None and trainer.training:
            augmentation = self.augment if isinstance(self.augment, BatchAugmentation) else self._augmentation()
            if augmentation is not None:
                images, labels = batch
                seed = self.training_streams.next_batch_seed(trainer.global_rank, fetched_batch(trainer))
                with seeded_streams(seed, images.device):
                    batch = (augment_normalized(images, augmentation, self.input_range()), labels)
        return batch

    def state_dict(self) -> dict:
        """Where the training order's and augmentation's streams are (the same on every rank), and the split's
        ``seed`` and ``val_fraction`` (``"split"``)."""
        return {**self.training_streams.state_dict(redone_batch(self.trainer)),
                "split": {"seed": self.seed, "val_fraction": self.val_fraction}}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the streams; a fit or validation from a checkpoint trained on another split is refused in one
        line (its validation images would now include images it trained on). ``test`` and ``predict`` read only
        the official test set, which the split does not touch: they take any split. Checkpoints from before the
        split was kept load as they are."""
        state = dict(state_dict)
        split = state.pop("split", None)
        now = {"seed": self.seed, "val_fraction": self.val_fraction}
        stage = self.trainer.state.fn if self.trainer is not None else None
        if split is not None and split != now and stage not in (TrainerFn.TESTING, TrainerFn.PREDICTING):
            raise ZSKDError(
                f"{type(self).__name__}: this checkpoint trained on the split of seed {split['seed']} and "
                f"val_fraction {split['val_fraction']}, the datamodule now has seed {self.seed} and val_fraction "
                f"{self.val_fraction}: its validation images would include training ones; resume with the "
                "checkpoint's, or start a new fit")
        self.training_streams.load_state_dict(state)

    # ------------------------------------------------------------------ splits
    def _split_sizes(self, n: int) -> tuple[int, int]:
        n_val = int(round(self.val_fraction * n))
        if self.val_fraction > 0 and n > 1:
            n_val = min(max(n_val, 1), n - 1)
        return n - n_val, n_val

    def split_indices(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Seeded ``(train_idx, val_idx)`` into an official training set of ``n`` items."""
        n_train, _ = self._split_sizes(n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        return perm[:n_train], perm[n_train:]

    def _setup_split(self, train: bool) -> None:
        """The validation split, and with ``train`` the training split (normalized float32: 553 MB for
        CIFAR-10's, which a data-free run validating on real images never reads)."""
        images, labels = self._load_official(train=True)
        train_idx, val_idx = self.split_indices(int(labels.shape[0]))
        if train:
            self.train_dataset = InMemoryImageDataset(self.normalize(images[train_idx]), labels[train_idx])
        self.val_dataset = InMemoryImageDataset(self.normalize(images[val_idx]), labels[val_idx])

    def _setup_test(self) -> None:
        images, labels = self._load_official(train=False)
        self.test_dataset = InMemoryImageDataset(self.normalize(images), labels)

    def setup(self, stage: str | None = None) -> None:
        """Load what ``stage`` needs (idempotent): fit -> train + val, validate -> val, test/predict -> test."""
        if stage not in (None, "fit", "validate", "test", "predict"):
            raise ZSKDError(f"unknown stage {stage!r}; expected fit, validate, test or predict")
        if stage in (None, "fit") and self.train_dataset is None:
            self._setup_split(train=True)
        elif stage == "validate" and self.val_dataset is None:
            self._setup_split(train=False)
        if stage == "fit":  # a new fit's streams (a resumed fit's come from its checkpoint, restored after setup)
            self.training_streams.start()
            if not len(self.val_dataset):  # val_fraction 0
                self._no_validation_this_fit()
        if stage in (None, "test", "predict") and self.test_dataset is None:
            self._setup_test()

    # ------------------------------------------------------------------ loaders
    def _require(self, dataset: Dataset | None, what: str) -> Dataset:
        if dataset is None:
            stage = {"train": "fit", "val": "fit' or 'validate", "test": "test", "predict": "predict"}[what]
            raise ZSKDError(
                f"{type(self).__name__}: call setup('{stage}') before asking for the {what} loader"
            )
        return dataset

    def _loader(self, dataset: Dataset | None, what: str, batch_size: int) -> DataLoader:
        """An evaluation loader, in order: under DDP this rank's unpadded share (:func:`~zskd_lightning.data.
        evaluation.evaluation_loader`), except for ``predict``, which Lightning shards without repeats itself."""
        dataset = self._require(dataset, what)
        args = dict(batch_size=batch_size, num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                    pin_memory=torch.cuda.is_available())
        if what == "predict":
            return DataLoader(dataset, generator=own_generator(), **args)
        return evaluation_loader(dataset, trainer=self.trainer, **args)

    def train_dataloader(self) -> DataLoader:
        """Shuffled by ``(fit seed, epoch)`` (:func:`~zskd_lightning.data.epoch_order.epoch_keyed_loader`). A last
        batch of one sample (this process's share one more than a multiple of the batch) is left out: BatchNorm
        cannot train on it."""
        dataset = self._require(self.train_dataset, "train")
        share = -(-len(dataset) // process_share(self.trainer)[1])  # this process's samples an epoch
        return epoch_keyed_loader(
            dataset,
            seed=self.training_streams.run_seed(),
            trainer=self.trainer,
            batch_size=self.batch_size,
            random_items=draws_per_item(dataset),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=share > self.batch_size and share % self.batch_size == 1,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, "val", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, "test", self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, "predict", self.eval_batch_size)
