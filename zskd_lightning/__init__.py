"""zskd-lightning: data-free knowledge distillation (Zero-Shot KD and friends) for PyTorch Lightning.

Layers, each importing only from its own and those above it (``tests/test_layers.py`` checks it):
0, leaves: ``_version``, ``errors``, ``files``, ``pixels``, ``describe``, ``randomness``, ``ranks``, ``modes``,
``batch_progress``, ``interrupts`` -> 1, building blocks: ``taps``, ``kernels``, ``teacher``, ``losses``,
``checks``, ``optim``, ``weighting``, ``augment``, ``models``, ``data``, ``export``, ``predictions``, ``metadata``,
``pictures``, ``random_resume``, ``hparams``, ``callbacks``, ``metrics`` -> 2, ``synthesis`` (what and how; no Lightning, writes
no files) -> 3, none importing another: ``impressions`` (offline cache, driver, datamodule), ``online`` (replay
buffer, round driver, datamodule), ``distillation``, ``classifier`` -> 4, ``cli`` and this package face.
"""

from zskd_lightning._version import __version__
from zskd_lightning.classifier import ClassifierModule
from zskd_lightning.distillation import DistillationModule
from zskd_lightning.errors import InvalidArgument, ZSKDError
from zskd_lightning.export import load_student
from zskd_lightning.impressions import ImpressionCache, ImpressionDataModule, ImpressionDataset, ImpressionSynthesis
from zskd_lightning.losses import kd_loss
from zskd_lightning.online import OnlineDataModule, OnlineSynthesis, PrioritySampler, ReplayBuffer, UniformSampler
from zskd_lightning.random_resume import ResumedRandomStreams
from zskd_lightning.synthesis import (
    ClassImpressionSynthesizer,
    FastSynthesizer,
    GeneratorSynthesizer,
    LopesSynthesizer,
    SSDKDSynthesizer,
    Synthesizer,
    WangSynthesizer,
    ZSKDSynthesizer,
)
from zskd_lightning.teacher import FrozenTeacher
from zskd_lightning.weighting import ModulatingFunction, SampleWeighting, TeacherUncertainty

__all__ = [
    "ClassImpressionSynthesizer",
    "ClassifierModule",
    "DistillationModule",
    "FastSynthesizer",
    "FrozenTeacher",
    "GeneratorSynthesizer",
    "ImpressionCache",
    "ImpressionDataModule",
    "ImpressionDataset",
    "ImpressionSynthesis",
    "InvalidArgument",
    "LopesSynthesizer",
    "ModulatingFunction",
    "OnlineDataModule",
    "OnlineSynthesis",
    "PrioritySampler",
    "ReplayBuffer",
    "ResumedRandomStreams",
    "SSDKDSynthesizer",
    "SampleWeighting",
    "Synthesizer",
    "TeacherUncertainty",
    "UniformSampler",
    "WangSynthesizer",
    "ZSKDError",
    "ZSKDSynthesizer",
    "__version__",
    "kd_loss",
    "load_student",
]
