"""Small conv nets for scikit-learn's 8x8 digits (fast CPU teacher/student pair)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DigitsConvNet", "DigitsConvNetHalf"]


class DigitsConvNet(nn.Module):
    """Tiny conv net for 8x8 digits.

    conv3x3(width, pad 1) -> ReLU -> conv3x3(2*width, pad 1) -> ReLU -> maxpool2
    -> flatten (2*width*4*4) -> FC 4*width -> ReLU -> FC num_classes.

    Input ``[B, in_channels, 8, 8]``, output logits ``[B, num_classes]``.

    Args:
        in_channels: channels of the input image.
        num_classes: number of output logits.
        width: filters of the first conv; the second has ``2*width``, the hidden FC ``4*width``.
        batch_norm: a BatchNorm2d after each conv (a teacher for the BatchNorm prior; off in the shipped one).
    """

    input_size: tuple[int, int] = (8, 8)

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, batch_norm: bool = False) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.width = width

        def conv(c_in: int, c_out: int) -> list[nn.Module]:
            norm = [nn.BatchNorm2d(c_out)] if batch_norm else []
            return [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), *norm, nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*conv(in_channels, width), *conv(width, 2 * width), nn.MaxPool2d(2))  # 8 -> 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * 4 * 4, 4 * width),
            nn.ReLU(inplace=True),
            nn.Linear(4 * width, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_channels, 8, 8]`` -> logits ``[B, num_classes]``."""
        return self.classifier(self.features(x))


class DigitsConvNetHalf(DigitsConvNet):
    """DigitsConvNet with width 16 (the student). ``[B, C, 8, 8]`` -> ``[B, num_classes]``."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__(in_channels=in_channels, num_classes=num_classes, width=16)
