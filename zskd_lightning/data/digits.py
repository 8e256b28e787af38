"""scikit-learn's 8x8 handwritten digits as a Lightning data module (tiny, offline, CPU-friendly)."""

from __future__ import annotations

import numpy as np
import torch

from zskd_lightning.augment import BatchAugmentation
from zskd_lightning.data.classification import ClassificationDataModule

__all__ = ["DigitsDataModule", "DIGITS_TEST_RANDOM_STATE", "DIGITS_TEST_SIZE"]

#: constant random_state of the fixed, stratified test split (never depends on the run's seed).
DIGITS_TEST_RANDOM_STATE = 20190601
#: fraction of the 1,797 images held out as the fixed test split.
DIGITS_TEST_SIZE = 0.2


def _fixed_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(images01 [1797, 8, 8] float32, labels [1797] int64, train_idx, test_idx)`` -- same on every call."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(labels.shape[0]),
        test_size=DIGITS_TEST_SIZE,
        stratify=labels,
        random_state=DIGITS_TEST_RANDOM_STATE,
    )
    return images, labels, np.sort(train_idx), np.sort(test_idx)


class DigitsDataModule(ClassificationDataModule):
    """scikit-learn ``load_digits()``: 1,797 grayscale 8x8 digits, values 0..16 scaled to [0, 1], 10 classes.

    Served as ``[1, 8, 8]`` float32, normalized with ``mean=0.3050``, ``std=0.3759`` (the pixel mean / std
    of the fixed training portion, rounded to 4 decimals).

    scikit-learn has no official test split, so a FIXED one is defined: a stratified 20% split with
    ``random_state=20190601`` (independent of ``seed``): **1,437 training / 360 test** images (35 to 37
    per class in test). ``seed`` splits the 1,437 training images into train / val; with the default
    ``val_fraction=0.1`` that is **1,293 train / 144 val**.

    ``augment=True`` shifts training batches by up to 1 pixel each way (uniform, sub-pixel: bilinear resampling,
    black beyond the border; ``BatchAugmentation(translate=1/8)``). ``root`` and ``download`` are accepted for a
    uniform interface and ignored (the data ships inside scikit-learn). Constructor arguments: see :class:`ClassificationDataModule`.
    """

    num_classes = 10
    mean = (0.3050,)
    std = (0.3759,)
    name = "digits"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (1, 8, 8)

    def prepare_data(self) -> None:  # nothing to download
        pass

    def _load_official(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels, train_idx, test_idx = _fixed_split()
        idx = train_idx if train else test_idx
        return torch.from_numpy(images[idx]).unsqueeze(1).contiguous(), torch.from_numpy(labels[idx])

    def _augmentation(self) -> BatchAugmentation:
        # Shifts of up to 1 px (1/8 of 8 px), sub-pixel.
        return BatchAugmentation(translate=(0.125, 0.125))
