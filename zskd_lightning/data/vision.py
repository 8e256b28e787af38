"""MNIST, Fashion-MNIST and CIFAR-10 as in-memory Lightning data modules (torchvision on-disk layout).

One implementation serves all three (:class:`TorchvisionDataModule`, configured by class attributes):
the torchvision dataset is constructed once per split, its ``.data`` / ``.targets`` are turned into one
uint8 ``[N, C, H, W]`` tensor, geometry changes (MNIST padding / resizing) and normalization are done in
bulk, and items are served from memory.

Files are downloaded (``download=True``) in ``prepare_data``; ``setup`` reads them with
``download=False`` (and downloads first only when they are missing and ``download=True``, for callers
that skip ``prepare_data``). Missing files on an offline machine raise one-line :class:`ZSKDError`
naming the dataset, the root and the exact files expected.
"""

from __future__ import annotations

import os
import pickle
import urllib.error
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from zskd_lightning.augment import BatchAugmentation
from zskd_lightning.data.classification import ClassificationDataModule
from zskd_lightning.errors import InvalidArgument, ZSKDError, described

__all__ = [
    "TorchvisionDataModule",
    "MNISTDataModule",
    "FashionMNISTDataModule",
    "CIFAR10DataModule",
    "RESIZE_MODES",
]

#: choices of ``resize_to_32`` for the 28x28 datasets.
RESIZE_MODES = ("pad", "resize", "none")

#: What torchvision's readers raise on a present but truncated or foreign file (MNIST's idx files carry no
#: checksum: an empty file is a ValueError, a wrong header an AssertionError or a KeyError).
_UNPARSABLE = (ValueError, TypeError, AssertionError, KeyError, EOFError, pickle.UnpicklingError)


class TorchvisionDataModule(ClassificationDataModule):
    """Shared loader for torchvision image-classification datasets kept in memory.

    Subclasses configure: ``dataset_name`` (for messages), ``num_classes``, ``mean``, ``std``,
    ``native_shape`` (C, H, W on disk) and implement :meth:`_torchvision_class`, :meth:`expected_files`,
    :meth:`_augmentation`, and optionally :meth:`_to_served_geometry`.
    """

    dataset_name: ClassVar[str] = ""
    native_shape: ClassVar[tuple[int, int, int]] = (1, 28, 28)

    # ------------------------------------------------------------------ configuration hooks
    @classmethod
    def _torchvision_class(cls) -> type:
        raise NotImplementedError

    def expected_files(self, train: bool | None = None) -> list[str]:
        """Absolute paths of the files this module reads (``train=None``: both splits)."""
        raise NotImplementedError

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.native_shape)  # type: ignore[return-value]

    def _to_served_geometry(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, C, H, W]`` on-disk geometry -> served geometry (uint8, or float in [0, 1])."""
        return images

    @staticmethod
    def _to_tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """torchvision dataset -> (uint8 ``[N, C, H, W]``, int64 ``[N]``)."""
        data = dataset.data
        if isinstance(data, torch.Tensor):  # MNIST family: uint8 [N, H, W]
            images = data.to(torch.uint8)
        else:  # CIFAR: numpy uint8 [N, H, W, C]
            images = torch.from_numpy(data)
        if images.ndim == 3:
            images = images.unsqueeze(1)
        elif images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
            images = images.permute(0, 3, 1, 2)
        targets = dataset.targets
        labels = targets.to(torch.int64) if isinstance(targets, torch.Tensor) else torch.as_tensor(targets)
        return images.contiguous(), labels.to(torch.int64)

    # ------------------------------------------------------------------ files
    def _abs_root(self) -> str:
        return os.path.abspath(self.root)

    def _files_present(self, train: bool) -> bool:
        return all(os.path.isfile(p) for p in self.expected_files(train))

    def _error(self, train: bool | None, cause: BaseException | None, downloading: bool) -> ZSKDError:
        files = self.expected_files(train)
        missing = [p for p in files if not os.path.isfile(p)]
        if downloading:
            what = f"download failed ({described(cause, limit=160)})" if cause is not None else "download failed"
        elif missing:
            what = "files not found"
            if cause is not None and not isinstance(cause, RuntimeError):
                what += f" ({described(cause, limit=160)})"
        else:
            what = "files present but unreadable or corrupted"
            if cause is not None:
                what += f" ({described(cause, limit=160)})"
        hint = (
            "download=True needs internet access"
            if self.download
            else "download=False, so nothing was downloaded (download=True needs internet access)"
        )
        return ZSKDError(
            f"{self.dataset_name}: {what} under root {self._abs_root()!r}; expected files: "
            f"{', '.join(files)}; put them there (or set root / ZSKD_DATA_ROOT); {hint}"
        )

    def _download(self, train: bool) -> None:
        try:
            self._torchvision_class()(self.root, train=train, download=True)
        except (RuntimeError, urllib.error.URLError, OSError) as exc:
            raise self._error(None, exc, downloading=True) from exc

    def prepare_data(self) -> None:
        """Download missing files when ``download=True`` (runs on one process only under DDP)."""
        if not self.download:
            return
        for train in (True, False):
            if not self._files_present(train):
                self._download(train)

    def _load_official(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.download and not self._files_present(train):
            self._download(train)
        try:
            dataset = self._torchvision_class()(self.root, train=train, download=False)
        except (RuntimeError, urllib.error.URLError, OSError, *_UNPARSABLE) as exc:
            raise self._error(train, exc, downloading=False) from exc
        images, labels = self._to_tensors(dataset)
        if tuple(images.shape[1:]) != tuple(self.native_shape):
            raise ZSKDError(
                f"{self.dataset_name}: images under {self._abs_root()!r} have shape "
                f"{tuple(images.shape[1:])}, expected {tuple(self.native_shape)}"
            )
        return self._to_served_geometry(images), labels


class _MNISTFamilyDataModule(TorchvisionDataModule):
    """28x28 grayscale idx-format datasets (``<root>/<Class>/raw/*-ubyte``), optionally 32x32 for LeNet-5.

    Args:
        resize_to_32: ``"pad"`` (default): pad 2 black pixels on every side -> ``[1, 32, 32]``;
            ``"resize"``: bilinear resize to ``[1, 32, 32]``; ``"none"``: serve ``[1, 28, 28]``.
        **kwargs: see :class:`~zskd_lightning.data.classification.ClassificationDataModule`.
    """

    native_shape = (1, 28, 28)

    def __init__(self, *, resize_to_32: str = "pad", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if resize_to_32 not in RESIZE_MODES:
            raise InvalidArgument(f"resize_to_32 must be one of {', '.join(RESIZE_MODES)}; got {resize_to_32!r}")
        self.resize_to_32 = resize_to_32

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (1, 28, 28) if self.resize_to_32 == "none" else (1, 32, 32)

    def expected_files(self, train: bool | None = None) -> list[str]:
        # torchvision's MNIST checks for all four files whichever split is asked for, so list all four.
        raw = os.path.join(self._abs_root(), self._torchvision_class().__name__, "raw")
        return [
            os.path.join(raw, f"{prefix}-{kind}")
            for prefix in ("train", "t10k")
            for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
        ]

    def _to_served_geometry(self, images: torch.Tensor) -> torch.Tensor:
        if self.resize_to_32 == "pad":
            return F.pad(images, (2, 2, 2, 2), value=0)
        if self.resize_to_32 == "resize":
            x = images.to(torch.float32) / 255.0
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
            return x.clamp_(0.0, 1.0)
        return images

    def _augmentation(self) -> BatchAugmentation:
        return BatchAugmentation(degrees=10.0, translate=(0.1, 0.1), scale=(0.9, 1.1))


class MNISTDataModule(_MNISTFamilyDataModule):
    """MNIST handwritten digits: 60,000 train / 10,000 test, 10 classes, normalized with 0.1307 / 0.3081.

    Served as ``[1, 32, 32]`` (2-pixel black padding, ``resize_to_32="pad"``), ``[1, 32, 32]`` resized
    (``"resize"``) or ``[1, 28, 28]`` (``"none"``). Files: ``<root>/MNIST/raw/{train,t10k}-{images-idx3,
    labels-idx1}-ubyte``. ``augment=True``: rotations up to 10 degrees, shifts up to 10%
    of the served size (3.2 px at 32) and zooms 0.9-1.1, as ``RandomAffine`` but sub-pixel (bilinear), black fill,
    on training batches only (``BatchAugmentation``). Other arguments: see :class:`ClassificationDataModule`.
    """

    dataset_name = "MNIST"
    name = "mnist"
    num_classes = 10
    mean = (0.1307,)
    std = (0.3081,)

    @classmethod
    def _torchvision_class(cls) -> type:
        from torchvision.datasets import MNIST

        return MNIST


class FashionMNISTDataModule(_MNISTFamilyDataModule):
    """Fashion-MNIST: 60,000 train / 10,000 test, 10 classes, normalized with 0.2860 / 0.3530.

    Same geometry options and augmentation as :class:`MNISTDataModule`. Files:
    ``<root>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``.
    """

    dataset_name = "Fashion-MNIST"
    name = "fashion_mnist"
    num_classes = 10
    mean = (0.2860,)
    std = (0.3530,)

    @classmethod
    def _torchvision_class(cls) -> type:
        from torchvision.datasets import FashionMNIST

        return FashionMNIST


class CIFAR10DataModule(TorchvisionDataModule):
    """CIFAR-10: 50,000 train / 10,000 test RGB ``[3, 32, 32]``, 10 classes.

    Normalized with mean ``(0.4914, 0.4822, 0.4465)``, std ``(0.2470, 0.2435, 0.2616)``. Files:
    ``<root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` (torchvision checks their
    md5 sums). ``augment=True``: shifts of up to 4 px each way (the range of
    ``RandomCrop(32, padding=4)``, but uniform and sub-pixel: bilinear, black beyond the border) and horizontal
    flips, on training batches only (``BatchAugmentation``). Arguments: see :class:`ClassificationDataModule`.
    """

    dataset_name = "CIFAR-10"
    name = "cifar10"
    num_classes = 10
    native_shape = (3, 32, 32)
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)

    @classmethod
    def _torchvision_class(cls) -> type:
        from torchvision.datasets import CIFAR10

        return CIFAR10

    def expected_files(self, train: bool | None = None) -> list[str]:
        folder = os.path.join(self._abs_root(), "cifar-10-batches-py")
        names = {
            True: [f"data_batch_{i}" for i in range(1, 6)],
            False: ["test_batch"],
            None: [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
        }[train] + ["batches.meta"]
        return [os.path.join(folder, n) for n in names]

    def _augmentation(self) -> BatchAugmentation:
        # Shifts of up to 4 px (RandomCrop(32, padding=4)'s range, sub-pixel) and horizontal flips.
        return BatchAugmentation(translate=(0.125, 0.125), hflip=True)
