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
