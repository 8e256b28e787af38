"""Impression synthesizers, the cache, and the distributed synthesis callback."""

from zskd_lightning.synthesis.base import ChunkRandomness, Objective, Regularizer, Synthesizer, TargetSampler
from zskd_lightning.synthesis.cache import ImpressionCache
from zskd_lightning.synthesis.callback import ImpressionSynthesis, fill_cache
from zskd_lightning.synthesis.class_impressions import ClassImpressionSynthesizer
from zskd_lightning.synthesis.objectives import SoftTargetCrossEntropy
from zskd_lightning.synthesis.regularizers import BatchNormStatistics, L2Prior, PixelL2Prior, TotalVariation
from zskd_lightning.synthesis.targets import DirichletTargets, OneHotTargets, class_similarity
from zskd_lightning.synthesis.zskd import ZSKDSynthesizer

__all__ = [
    "BatchNormStatistics",
    "ChunkRandomness",
    "ClassImpressionSynthesizer",
    "DirichletTargets",
    "ImpressionCache",
    "ImpressionSynthesis",
    "L2Prior",
    "Objective",
    "OneHotTargets",
    "PixelL2Prior",
    "Regularizer",
    "SoftTargetCrossEntropy",
    "Synthesizer",
    "TargetSampler",
    "TotalVariation",
    "ZSKDSynthesizer",
    "class_similarity",
    "fill_cache",
]
