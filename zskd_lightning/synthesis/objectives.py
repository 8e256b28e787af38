"""Objectives: per-sample losses between the teacher's response and the targets."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from zskd_lightning.errors import InvalidArgument
from zskd_lightning.losses import soft_cross_entropy
from zskd_lightning.synthesis.base import Objective


class SoftTargetCrossEntropy(Objective):
    """``CE(y, softmax(logits / T))`` per sample, ``[N]``: ZSKD's matching loss (T = 20 in the paper)."""

    def __init__(self, temperature: float = 20.0) -> None:
        if temperature <= 0:
            raise InvalidArgument(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        return soft_cross_entropy(logits, targets, self.temperature)

    def settings(self) -> dict[str, Any]:
        return {"name": type(self).__name__, "temperature": self.temperature}
