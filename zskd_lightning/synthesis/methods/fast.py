"""FastDFKD (Fang, Mo, Wang, Song, Bei, Song; "Up to 100x Faster Data-free Knowledge Distillation", AAAI 2022)
and the DAFL terms (Chen et al., "Data-Free Learning of Student Networks", ICCV 2019) for teachers without
BatchNorm: the online baseline of the generator family.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from zskd_lightning.errors import InvalidArgument
from zskd_lightning.synthesis.api import Regularizer
from zskd_lightning.synthesis.generator import GeneratorSynthesizer
from zskd_lightning.synthesis.methods.wang2021 import (
    FeatureActivation,
    ScaledSoftTargetCrossEntropy,
)
from zskd_lightning.synthesis.regularizers import BatchNormStatistics, BatchNormStatisticsWithMomentum
from zskd_lightning.synthesis.response_terms import ClassBalance, Disagreement, TeacherArgmaxCrossEntropy


class FastSynthesizer(GeneratorSynthesizer):
    """A generator trained each round on cross-entropy to a sampled class, the adversarial disagreement with the
    student, and, by weight (0 leaves a term out):

    - ``batchnorm``: DeepInversion's BatchNorm statistics (FastDFKD: 10; needs a teacher with BatchNorm, else a
      one-line error), matched with a memory of earlier rounds' statistics at ``batchnorm_momentum`` (FastDFKD's
      code: 0.9; default ``None``, none: see
      :class:`~zskd_lightning.synthesis.BatchNormStatisticsWithMomentum`);
    - ``activation`` and ``balance``: DAFL's activation (``-mean |f|`` at the classifier's input; DAFL 0.1) and
      information-entropy terms, for teachers without BatchNorm. DAFL weighs the latter 5 in ``log10`` units;
      :class:`ClassBalance` is in nats, where DAFL's weight is about 2.17: the default 5 (the MNIST online
      configs' value) is 2.3 times DAFL's.

    ``classes``: the cross-entropy's target: ``"sampled"``, a class drawn per input (FastDFKD; the generator
    must map each noise to its class within a round), or ``"teacher"``, the teacher's own argmax (DAFL's one-hot
    loss; inputs are labelled by the teacher's argmax in the buffer).

    FastDFKD's weights on CIFAR: cross-entropy 0.4-0.5, adversarial 1.1-1.33, BatchNorm 10, 2 to 10 generator
    steps per round from a Reptile-learned start (``reptile_lr``). ``generator_settings``: the engine's
    (``batch_size``, ``steps_per_round``, ``lr``, ``width``, ...), see
    :class:`~zskd_lightning.synthesis.generator.GeneratorSynthesizer`.
    """

    identity_name = "fast"

    def __init__(self, cross_entropy: float = 1.0, adversarial: float = 1.0, batchnorm: float = 0.0,
                 activation: float = 0.1, balance: float = 5.0, adversarial_temperature: float = 1.0,
                 classes: Literal["sampled", "teacher"] = "sampled", regularizers: Sequence[Regularizer] = (),
                 batchnorm_momentum: float | None = None, **generator_settings: Any) -> None:
        if not cross_entropy > 0:
            raise InvalidArgument(f"cross_entropy must be > 0, got {cross_entropy}")
        if batchnorm_momentum is not None and not batchnorm:
            raise InvalidArgument(f"batchnorm_momentum ({batchnorm_momentum}) blends the BatchNorm term's "
                                  f"statistics, and batchnorm is {batchnorm}: give the term a weight, or no momentum")
        if not adversarial_temperature > 0:
            raise InvalidArgument(f"adversarial_temperature must be > 0, got {adversarial_temperature}")
        terms = []
        if batchnorm:
            terms.append(BatchNormStatistics(batchnorm) if batchnorm_momentum is None
                         else BatchNormStatisticsWithMomentum(batchnorm, batchnorm_momentum))
        if activation:
            terms.append(FeatureActivation(activation))
        if balance:
            terms.append(ClassBalance(balance))
        if adversarial:
            terms.append(Disagreement(adversarial, adversarial_temperature))
        if classes not in ("sampled", "teacher"):
            raise InvalidArgument(f"classes must be 'sampled' or 'teacher', got {classes!r}")
        objective = (ScaledSoftTargetCrossEntropy(temperature=1.0, scale=cross_entropy) if classes == "sampled"
                     else TeacherArgmaxCrossEntropy(cross_entropy))
        terms += list(regularizers)  # input priors, e.g. PixelL2Prior
        super().__init__(objective=objective, labels_from_teacher=classes == "teacher", regularizers=terms,
                         **generator_settings)

