"""Terms on a batch's responses for generator methods: DAFL's class balance and one-hot loss, FastDFKD's
adversarial disagreement.

The first two are :class:`~zskd_lightning.synthesis.api.Regularizer` s (added with their ``weight``), the one-hot
loss an :class:`~zskd_lightning.synthesis.api.Objective`; DAFL's activation term is
:class:`~zskd_lightning.synthesis.methods.wang2021.FeatureActivation`.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from zskd_lightning.errors import InvalidArgument
from zskd_lightning.synthesis.api import Objective, Regularizer, Response


class ClassBalance(Regularizer):
    """DAFL's information-entropy term (Chen et al., ICCV 2019): ``log K - H(mean_i softmax(t_i))``, a scalar
    >= 0 that is 0 when the batch's mean teacher prediction is uniform over the ``K`` classes. Lowering it
    spreads a generator's output over every class.

    In nats (natural logarithm). DAFL's public code takes ``log10``, so its weight ``w`` is ``w / ln 10`` here
    (its 5 is about 2.17); a weight of 5 here is 2.3 times DAFL's term."""

    batch_level = True

    def __init__(self, weight: float = 5.0) -> None:
        self.weight = float(weight)

    def __call__(self, inputs: Tensor, response: Response) -> Tensor:
        mean = response.logits.float().softmax(dim=-1).mean(dim=0)
        return math.log(mean.numel()) + (mean * mean.clamp_min(1e-12).log()).sum()


class Disagreement(Regularizer):
    """The adversarial term of the FastDFKD family: ``-KL(p_T || p_S)`` per sample at temperature ``T``, ``[N]``.
    Lowering it makes inputs on which the student disagrees with the teacher.

    ``agreeing_only`` (as in FastDFKD's public code): count only the samples whose student argmax equals the
    teacher's, so the generator is not pushed further where the student is already wrong.
    """

    needs_student = True

    def __init__(self, weight: float = 1.0, temperature: float = 1.0, agreeing_only: bool = True) -> None:
        if temperature <= 0:
            raise InvalidArgument(f"temperature must be > 0, got {temperature}")
        self.weight, self.temperature, self.agreeing_only = float(weight), float(temperature), bool(agreeing_only)

    def __call__(self, inputs: Tensor, response: Response) -> Tensor:
        if response.student_logits is None:
            raise InvalidArgument("Disagreement compares teacher and student: run it where a student is given")
        log_t = F.log_softmax(response.logits.float() / self.temperature, dim=-1)
        log_s = F.log_softmax(response.student_logits.float() / self.temperature, dim=-1)
        kl = (log_t.exp() * (log_t - log_s)).sum(dim=-1)
        if self.agreeing_only:
            kl = kl * (response.logits.argmax(-1) == response.student_logits.argmax(-1)).float()
        return -kl


class TeacherArgmaxCrossEntropy(Objective):
    """DAFL's one-hot loss: ``CE(softmax(t_i), argmax t_i)`` per sample, ``[N]``: makes each input a confident
    example of whichever class the teacher already sees in it (the targets are ignored), so an unconditional
    generator need not memorize which noise was given which class. ``scale`` multiplies it."""

    def __init__(self, scale: float = 1.0) -> None:
        if not scale > 0:
            raise InvalidArgument(f"scale must be > 0, got {scale}")
        self.scale = float(scale)

    def __call__(self, response: Response, targets: Tensor) -> Tensor:
        logits = response.logits.float()
        return self.scale * F.cross_entropy(logits, logits.argmax(dim=-1), reduction="none")
