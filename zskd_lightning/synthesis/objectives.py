"""Objectives: per-sample losses between the teacher's response and the targets."""

from __future__ import annotations

from torch import Tensor

from zskd_lightning.errors import InvalidArgument
from zskd_lightning.losses import soft_cross_entropy
from zskd_lightning.synthesis.api import Objective, Response


class SoftTargetCrossEntropy(Objective):
    """``CE(y, softmax(logits / T))`` per sample, ``[N]``: ZSKD's matching loss (T = 20 in the paper)."""

    def __init__(self, temperature: float = 20.0) -> None:
        if temperature <= 0:
            raise InvalidArgument(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def __call__(self, response: Response, targets: Tensor) -> Tensor:
        return soft_cross_entropy(response.logits, targets, self.temperature)
