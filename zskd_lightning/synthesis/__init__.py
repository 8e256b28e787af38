"""What and how of synthesis: target samplers, objectives, regularizers, the inversion engine, and the methods.

No Lightning here, and nothing here writes a file (Lopes reads its metadata file): the drivers in
:mod:`zskd_lightning.impressions` run these chunk by chunk, and those in :mod:`zskd_lightning.online` run the
generator engine round by round.
"""

from zskd_lightning.synthesis.api import (
    Chunk,
    ChunkRandomness,
    Objective,
    Regularizer,
    Response,
    SynthesisContext,
    SynthesisResult,
    TargetSampler,
)
from zskd_lightning.synthesis.generator import GeneratorSynthesizer, ImageGenerator
from zskd_lightning.synthesis.inversion import Synthesizer
from zskd_lightning.synthesis.loss_scale import LossScale
from zskd_lightning.synthesis.methods import (
    ClassImpressionSynthesizer,
    FastSynthesizer,
    FeatureActivation,
    GaussianFeatureTargets,
    LopesSynthesizer,
    SSDKDSynthesizer,
    WangSynthesizer,
    ZSKDSynthesizer,
)
from zskd_lightning.synthesis.objectives import SoftTargetCrossEntropy
from zskd_lightning.synthesis.regularizers import (
    BatchNormStatistics,
    BatchNormStatisticsWithMomentum,
    L2Prior,
    PixelL2Prior,
    TotalVariation,
)
from zskd_lightning.synthesis.response_terms import ClassBalance, Disagreement
from zskd_lightning.synthesis.targets import (
    DirichletTargets,
    OneHotTargets,
    class_similarity,
)

__all__ = [
    "BatchNormStatistics",
    "BatchNormStatisticsWithMomentum",
    "Chunk",
    "ChunkRandomness",
    "ClassBalance",
    "ClassImpressionSynthesizer",
    "DirichletTargets",
    "Disagreement",
    "FastSynthesizer",
    "FeatureActivation",
    "GaussianFeatureTargets",
    "GeneratorSynthesizer",
    "ImageGenerator",
    "L2Prior",
    "LopesSynthesizer",
    "LossScale",
    "Objective",
    "OneHotTargets",
    "PixelL2Prior",
    "Regularizer",
    "Response",
    "SSDKDSynthesizer",
    "SoftTargetCrossEntropy",
    "SynthesisContext",
    "SynthesisResult",
    "Synthesizer",
    "TargetSampler",
    "TotalVariation",
    "WangSynthesizer",
    "ZSKDSynthesizer",
    "class_similarity",
]
