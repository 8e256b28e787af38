"""zskd-lightning: data-free knowledge distillation (Zero-Shot KD and friends) for PyTorch Lightning."""

__version__ = "0.1.0"

from zskd_lightning.classifier import ClassifierModule  # noqa: E402
from zskd_lightning.distillation import DistillationModule  # noqa: E402
from zskd_lightning.errors import InvalidArgument, ZSKDError  # noqa: E402
from zskd_lightning.impressions import ImpressionDataModule, ImpressionDataset  # noqa: E402
from zskd_lightning.losses import kd_loss  # noqa: E402
from zskd_lightning.synthesis import (  # noqa: E402
    ClassImpressionSynthesizer,
    ImpressionCache,
    ImpressionSynthesis,
    Synthesizer,
    ZSKDSynthesizer,
)
from zskd_lightning.teacher import FrozenTeacher  # noqa: E402

__all__ = [
    "ClassImpressionSynthesizer",
    "ClassifierModule",
    "DistillationModule",
    "FrozenTeacher",
    "ImpressionCache",
    "ImpressionDataModule",
    "ImpressionDataset",
    "ImpressionSynthesis",
    "InvalidArgument",
    "Synthesizer",
    "ZSKDError",
    "ZSKDSynthesizer",
    "__version__",
    "kd_loss",
]
