"""Real labelled image data (for teachers, real-data baselines and evaluation), and the base of synthetic data."""

from zskd_lightning.data.classification import ClassificationDataModule
from zskd_lightning.data.digits import DigitsDataModule
from zskd_lightning.data.synthetic import SyntheticDataModule
from zskd_lightning.data.vision import CIFAR10DataModule, FashionMNISTDataModule, MNISTDataModule

__all__ = [
    "CIFAR10DataModule",
    "ClassificationDataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "MNISTDataModule",
    "SyntheticDataModule",
]
