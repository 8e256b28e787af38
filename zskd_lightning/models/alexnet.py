"""The CIFAR-10 AlexNet of the ZSKD paper (Nayak et al., 2019) and its half-width student."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["AlexNet", "AlexNetHalf"]

# LocalResponseNorm settings, in PyTorch's convention (alpha multiplies the MEAN of the squares over the window):
# size 5, alpha 1e-4, beta 0.75, k 2, PyTorch's defaults apart from k. Krizhevsky et al.'s alpha 1e-4 multiplies
# the SUM (so theirs is alpha 5e-4 here), and the ZSKD authors' TensorFlow AlexNet uses depth radius 2, alpha
# 1e-4 on the sum and bias 1 (here: size 5, alpha 5e-4, k 1). The benchmark CIFAR-10 teacher was trained with
# these values, which stay.
_LRN_SIZE = 5
_LRN_ALPHA = 1e-4
_LRN_BETA = 0.75
_LRN_K = 2.0


def _pool_out(n: int, kernel: int = 3, stride: int = 2) -> int:
    """Spatial size after a max-pool without padding."""
    return (n - kernel) // stride + 1


class AlexNet(nn.Module):
    """AlexNet for 32x32 CIFAR input, as used as the CIFAR-10 teacher in ZSKD.

    Five conv blocks (5x5, 5x5, 3x3, 3x3, 3x3; "same" padding) with ReLU, LRN after the
    first two, 3x3/stride-2 max-pools after blocks 1, 2 and 5, and BatchNorm2d closing every
    block; then FC -> ReLU -> Dropout -> BatchNorm1d twice and a final FC classifier.
    For 32x32 input the spatial size goes 32 -> 15 -> 7 -> 3, so the flatten size is
    ``conv_widths[4] * 3 * 3`` (computed from ``input_size``).

    LRN: ``nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2)``, a weaker normalization than the ZSKD authors'
    (``size 5, alpha 5e-4, k 1`` in PyTorch's convention; see the module's constants): weights trained with
    theirs do not carry over unchanged.

    Input ``[B, in_channels, 32, 32]``, output logits ``[B, num_classes]``.
    Needs batch >= 2 in train mode (BatchNorm1d).

    Args:
        in_channels: channels of the input image.
        num_classes: number of output logits.
        dropout: dropout probability in the FC head.
        conv_widths: the five conv widths, default ``(48, 128, 192, 192, 128)``.
        fc_widths: the two hidden FC sizes, default ``(512, 256)``.
    """

    input_size: tuple[int, int] = (32, 32)
    default_conv_widths: tuple[int, int, int, int, int] = (48, 128, 192, 192, 128)
    default_fc_widths: tuple[int, int] = (512, 256)

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        dropout: float = 0.5,
        conv_widths: Sequence[int] | None = None,
        fc_widths: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = tuple(conv_widths) if conv_widths is not None else self.default_conv_widths
        f1, f2 = tuple(fc_widths) if fc_widths is not None else self.default_fc_widths
        self.in_channels = in_channels
        self.num_classes = num_classes

        def lrn() -> nn.LocalResponseNorm:
            return nn.LocalResponseNorm(_LRN_SIZE, alpha=_LRN_ALPHA, beta=_LRN_BETA, k=_LRN_K)

        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            lrn(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.BatchNorm2d(c1),
            nn.Conv2d(c1, c2, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            lrn(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.BatchNorm2d(c2),
            nn.Conv2d(c2, c3, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.BatchNorm2d(c3),
            nn.Conv2d(c3, c4, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.BatchNorm2d(c4),
            nn.Conv2d(c4, c5, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.BatchNorm2d(c5),
        )
        h, w = self.input_size
        for _ in range(3):  # the three 3x3/stride-2 pools; the convs keep the size
            h, w = _pool_out(h), _pool_out(w)
        flat = c5 * h * w
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, f1),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.BatchNorm1d(f1),
            nn.Linear(f1, f2),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.BatchNorm1d(f2),
            nn.Linear(f2, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_channels, 32, 32]`` -> logits ``[B, num_classes]``."""
        return self.classifier(self.features(x))


class AlexNetHalf(AlexNet):
    """AlexNet with halved widths: filters 24/64/96/96/64, FC 256/128 (the ZSKD CIFAR-10 student).

    Input ``[B, in_channels, 32, 32]``, output logits ``[B, num_classes]``.
    """

    default_conv_widths = (24, 64, 96, 96, 64)
    default_fc_widths = (256, 128)

    def __init__(self, in_channels: int = 3, num_classes: int = 10, dropout: float = 0.5) -> None:
        super().__init__(
            in_channels=in_channels,
            num_classes=num_classes,
            dropout=dropout,
            conv_widths=self.default_conv_widths,
            fc_widths=self.default_fc_widths,
        )
