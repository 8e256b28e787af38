"""MNIST, Fashion-MNIST and CIFAR-10 as in-memory Lightning data modules (torchvision on-disk layout).

One implementation serves all three (:class:`TorchvisionDataModule`, configured by class attributes):
each split's files are read on their own (the test split needs only the test files) into one uint8
``[N, C, H, W]`` tensor, geometry changes (MNIST padding / resizing) and normalization are done in bulk, and
items are served from memory.

Files are downloaded (``download=True``) in ``prepare_data``; ``setup`` reads them with
``download=False`` (and downloads first only when they are missing and ``download=True``, for callers
that skip ``prepare_data``). Missing files on an offline machine raise one-line :class:`ZSKDError`
naming the dataset, the root and the exact files expected.
"""

from __future__ import annotations

import os
import pickle
import urllib.error
import warnings
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
        """The torchvision dataset class, used to download (it fetches both splits)."""
        raise NotImplementedError

    def expected_files(self, train: bool | None = None) -> list[str]:
        """Absolute paths of the files this module reads (``train=None``: both splits)."""
        raise NotImplementedError

    def _read_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Read one split's files only (:meth:`expected_files` of ``train``): (uint8 ``[N, C, H, W]`` on-disk
        geometry, int64 ``[N]``). torchvision's readers check both splits' files whichever is asked for, so a
        user who holds only the test files (data-free distillation's usual case) could not evaluate."""
        raise NotImplementedError

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.native_shape)  # type: ignore[return-value]

    def _to_served_geometry(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, C, H, W]`` on-disk geometry -> served geometry (uint8, or float in [0, 1])."""
        return images

    # ------------------------------------------------------------------ files
    def _abs_root(self) -> str:
        return os.path.abspath(self.root)

    def _intact(self, path: str) -> bool:
        """Whether ``path`` is present and, where the format carries an official checksum, matches it."""
        return os.path.isfile(path)

    def _files_present(self, train: bool | None) -> bool:
        return all(self._intact(p) for p in self.expected_files(train))

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
        if not downloading and not missing:
            hint = f"delete a damaged file to have it downloaded again; {hint}"
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
        """Download missing or damaged files when ``download=True`` (runs on one process only under DDP). A split
        that cannot be downloaded is a warning here, not an error: the stage may not read it (a data-free run
        tests on the test split and never reads the training split); ``setup`` of a stage that reads it raises."""
        if not self.download:
            return
        for train in (True, False):
            if not self._files_present(train):
                try:
                    self._download(train)
                except ZSKDError as err:  # named by this split's files (the download fetches both splits')
                    warnings.warn(f"{'training' if train else 'test'} split not available: "
                                  f"{self._error(train, err.__cause__, downloading=True)}", stacklevel=2)

    def _load_official(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.download and not self._files_present(train):
            self._download(train)
        try:
            images, labels = self._read_split(train)
        except (RuntimeError, OSError, *_UNPARSABLE) as exc:
            raise self._error(train, exc, downloading=False) from exc
        if len(images) != len(labels):
            raise self._error(train, ValueError(f"{len(images)} images but {len(labels)} labels"), downloading=False)
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < self.num_classes:
            raise self._error(train, ValueError(f"labels span {int(labels.min())}..{int(labels.max())}, expected "
                                                f"0..{self.num_classes - 1}"), downloading=False)
        if tuple(images.shape[1:]) != tuple(self.native_shape):
            raise ZSKDError(
                f"{self.dataset_name}: images in {', '.join(self.expected_files(train))} have shape "
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
        raw = os.path.join(self._abs_root(), self._torchvision_class().__name__, "raw")
        prefixes = {True: ("train",), False: ("t10k",), None: ("train", "t10k")}[train]
        return [os.path.join(raw, f"{prefix}-{kind}")
                for prefix in prefixes for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]

    def _read_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.datasets.mnist import read_image_file, read_label_file

        images_file, labels_file = self.expected_files(train)  # a missing one: FileNotFoundError from its reader
        return read_image_file(images_file).unsqueeze(1).contiguous(), read_label_file(labels_file).to(torch.int64)

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
    ``<root>/cifar-10-batches-py/{data_batch_1..5, test_batch}``, each split read on its own (the test split needs
    only ``test_batch``), each file checked against its official md5 before it is unpickled. ``augment=True``: shifts of up to 4 px each way (the range of
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
        return [os.path.join(folder, name) for name, _ in self._official_batches(train)]

    @classmethod
    def _official_batches(cls, train: bool | None) -> list[tuple[str, str]]:
        """``(file name, md5)`` of the split's pickled batches, as torchvision lists them."""
        dataset = cls._torchvision_class()
        return {True: dataset.train_list, False: dataset.test_list,
                None: dataset.train_list + dataset.test_list}[train]

    def _intact(self, path: str) -> bool:
        from torchvision.datasets.utils import check_integrity

        md5 = dict(self._official_batches(None)).get(os.path.basename(path))
        return check_integrity(path, md5)

    def _read_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.datasets.utils import calculate_md5

        images, labels = [], []
        for path, (_, md5) in zip(self.expected_files(train), self._official_batches(train)):
            actual = calculate_md5(path)  # a missing file: FileNotFoundError
            if actual != md5:  # only the official files are unpickled
                raise ValueError(f"{os.path.basename(path)} has md5 {actual}, expected the official {md5}")
            with open(path, "rb") as file:
                batch = pickle.load(file, encoding="latin1")
            images.append(torch.from_numpy(batch["data"]).reshape(-1, *self.native_shape))
            labels.append(torch.as_tensor(batch["labels"], dtype=torch.int64))
        return torch.cat(images), torch.cat(labels)

    def _augmentation(self) -> BatchAugmentation:
        # Shifts of up to 4 px (RandomCrop(32, padding=4)'s range, sub-pixel) and horizontal flips.
        return BatchAugmentation(translate=(0.125, 0.125), hflip=True)
