"""LeNet-5 and its half-width variant (the MNIST teacher/student pair of the ZSKD paper)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["LeNet5", "LeNet5Half"]


class LeNet5(nn.Module):
    """LeNet-5 for 32x32 input.

    conv5x5(c1) -> ReLU -> maxpool2 -> conv5x5(c2) -> ReLU -> maxpool2 -> flatten (c2*5*5)
    -> FC f1 -> ReLU -> FC f2 -> ReLU -> FC num_classes.

    Input ``[B, in_channels, 32, 32]``, output logits ``[B, num_classes]``.

    Args:
        in_channels: channels of the input image.
        num_classes: number of output logits.
        widths: ``(c1, c2, f1, f2)``: the two conv widths and the two hidden FC sizes.
            Default ``(6, 16, 120, 84)`` is the classic LeNet-5.
    """

    input_size: tuple[int, int] = (32, 32)
    default_widths: tuple[int, int, int, int] = (6, 16, 120, 84)

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        c1, c2, f1, f2 = tuple(widths) if widths is not None else self.default_widths
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=5),  # 32 -> 28
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 28 -> 14
            nn.Conv2d(c1, c2, kernel_size=5),  # 14 -> 10
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 10 -> 5
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * 5 * 5, f1),
            nn.ReLU(inplace=True),
            nn.Linear(f1, f2),
            nn.ReLU(inplace=True),
            nn.Linear(f2, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_channels, 32, 32]`` -> logits ``[B, num_classes]``."""
        return self.classifier(self.features(x))


class LeNet5Half(LeNet5):
    """LeNet-5 with every width halved: conv 3/8 filters, FC 60/42 (the ZSKD MNIST student).

    Input ``[B, in_channels, 32, 32]``, output logits ``[B, num_classes]``.
    """

    default_widths = (3, 8, 60, 42)

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__(in_channels=in_channels, num_classes=num_classes, widths=self.default_widths)
