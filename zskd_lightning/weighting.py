"""Per-sample weights: how much each sample counts, in inversion and in distillation.

A :class:`SampleWeighting` maps a batch's teacher response to one non-negative weight per sample, ``[N]``,
without gradient. The inversion engine multiplies each impression's loss by it; ``DistillationModule``
multiplies each sample's KD loss by it (``mean_i w_i * l_i``). Without a weighting both are exactly as before
(plain sum over impressions, batch-mean KD loss).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from zskd_lightning.describe import Recorded
from zskd_lightning.errors import InvalidArgument


class SampleWeighting(Recorded, ABC):
    """One weight per sample from the teacher's logits (and the student's, where a method compares them)."""

    @abstractmethod
    def __call__(self, teacher_logits: Tensor, student_logits: Tensor | None = None) -> Tensor:
        """``teacher_logits [N, K]`` (``student_logits [N, K]`` or ``None``) -> weights ``[N]`` float32, no grad."""


class TeacherUncertainty(SampleWeighting):
    """Focal-style difficulty ``(1 - max_k p_T(k | x))^gamma``: samples the teacher is sure of count less.

    ``temperature`` softens ``p_T`` first (1: the teacher's own probabilities). ``gamma = 0`` weighs all alike.
    """

    def __init__(self, gamma: float = 2.0, temperature: float = 1.0) -> None:
        if gamma < 0 or temperature <= 0:
            raise InvalidArgument(f"gamma must be >= 0 and temperature > 0, got {gamma} and {temperature}")
        self.gamma, self.temperature = float(gamma), float(temperature)

    def __call__(self, teacher_logits: Tensor, student_logits: Tensor | None = None) -> Tensor:
        with torch.no_grad():
            confidence = torch.softmax(teacher_logits.float() / self.temperature, dim=-1).amax(dim=-1)
            return (1 - confidence).clamp_min(0).pow(self.gamma)


class ClassDiversity(SampleWeighting):
    """SSD-KD's diversity part (reconstructed; the paper's form is not public): with ``c_i`` the teacher's
    argmax on sample ``i`` and ``m_c`` the number of reference samples predicted as class ``c`` (the counts given
    to :meth:`observe`, e.g. the replay buffer's, plus the batch itself), ``d_i = (M + K) / (K (m_{c_i} + 1))``
    with ``M = sum_c m_c``: Laplace-smoothed inverse class frequency, about 1 for a balanced reference, lower the
    more samples share ``c_i``."""

    def __init__(self) -> None:
        self.counts: Tensor | None = None

    def observe(self, counts: Tensor) -> None:
        """Reference counts per class ``[K]`` (int), e.g. the replay buffer's counts of the teacher's predicted
        classes (``ReplayBuffer.predicted_counts``)."""
        self.counts = counts.detach().long().cpu()

    def __call__(self, teacher_logits: Tensor, student_logits: Tensor | None = None) -> Tensor:
        with torch.no_grad():
            num_classes = teacher_logits.shape[-1]
            predicted = teacher_logits.argmax(dim=-1)
            counts = torch.bincount(predicted, minlength=num_classes).float()
            if self.counts is not None and len(self.counts) == num_classes:
                counts = counts + self.counts.to(counts.device).float()
            return ((counts.sum() + num_classes) / (num_classes * (counts[predicted] + 1))).float()


class ModulatingFunction(SampleWeighting):
    """SSD-KD's modulating function (Liu et al., CVPR 2024) ``phi = diversity x difficulty``, reconstructed in the
    standard forms: :class:`ClassDiversity` times :class:`TeacherUncertainty` ``(1 - p_T(y^|x))^gamma``.

    ``normalize`` divides by the batch mean, so phi re-weights samples without changing the loss's scale (a
    confident teacher would otherwise shrink every weight toward 0), however small the mean; a batch whose every
    difficulty rounds to 0 in float32 (margins of about 17 logits at ``temperature`` 1) is weighed uniformly,
    not dropped. ``diversity`` / ``difficulty`` switch the
    parts off (ablations).

    ``temperature`` (default 20, :class:`~zskd_lightning.DistillationModule`'s and ZSKD's distillation
    temperature) softens ``p_T`` in the difficulty: at 1 a confident teacher's difficulties all round to about 0
    and phi is left to the few unsure inputs (MNIST: 9 points under the online baseline at 1; README, "SSD-KD").
    """

    def __init__(self, gamma: float = 2.0, temperature: float = 20.0, diversity: bool = True, difficulty: bool = True,
                 normalize: bool = True) -> None:
        self.difficulty = TeacherUncertainty(gamma, temperature) if difficulty else None
        self.diversity = ClassDiversity() if diversity else None
        self.normalize = bool(normalize)

    def observe(self, counts: Tensor) -> None:
        """The reference class counts of the diversity part (see :class:`ClassDiversity`)."""
        if self.diversity is not None:
            self.diversity.observe(counts)

    def __call__(self, teacher_logits: Tensor, student_logits: Tensor | None = None) -> Tensor:
        with torch.no_grad():
            phi = torch.ones(teacher_logits.shape[0], device=teacher_logits.device)
            if self.difficulty is not None:
                phi = phi * self.difficulty(teacher_logits)
            if self.diversity is not None:
                phi = phi * self.diversity(teacher_logits)
            if self.normalize:
                mean = phi.mean()
                phi = torch.where(mean > 0, phi / mean, torch.ones_like(phi))
            return phi.float()
