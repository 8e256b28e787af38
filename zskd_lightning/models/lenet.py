"""LeNet-5 and its half-width variant (the MNIST teacher/student pair of the ZSKD paper)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["LeNet5", "LeNet5Half", "MaxPool2x2"]


class MaxPool2x2(nn.MaxPool2d):
    """2x2 max pooling with stride 2, ``[B, C, H, W]`` -> ``[B, C, H/2, W/2]``: ``nn.MaxPool2d(2)``, faster
    without autograd.

    When no gradient flows through it (a frozen teacher's forward in distillation, evaluation) and ``H`` and
    ``W`` are even, it takes the elementwise maximum of the four strided views: the same values, and on 2 CPU
    cores LeNet-5's no-grad forward at batch 256 runs 2.1x faster (``benchmarks/distillation_step.py``; CPU
    ``max_pool2d`` is slow for few channels). With autograd it is ``max_pool2d`` itself (whose backward is faster).
    """

    def __init__(self) -> None:
        super().__init__(kernel_size=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() and x.requires_grad) or x.shape[-1] % 2 or x.shape[-2] % 2:
            return super().forward(x)
        top = torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2])
        return torch.maximum(top, torch.maximum(x[..., 1::2, 0::2], x[..., 1::2, 1::2]))


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
            MaxPool2x2(),  # 28 -> 14
            nn.Conv2d(c1, c2, kernel_size=5),  # 14 -> 10
            nn.ReLU(inplace=True),
            MaxPool2x2(),  # 10 -> 5
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
