"""CIFAR-style ResNet-18 / ResNet-34 (3x3 stem, no max-pool)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from zskd_lightning.errors import InvalidArgument

__all__ = ["BasicBlock", "CIFARResNet", "ResNet18", "ResNet34"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN projection) shortcut.

    ``[B, in_planes, H, W]`` -> ``[B, planes, H/stride, W/stride]``.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CIFARResNet(nn.Module):
    """ResNet with BasicBlocks for CIFAR: 3x3/64 stem (stride 1, no max-pool), four stages of
    widths 64/128/256/512 (strides 1/2/2/2), global average pool, FC classifier.

    Input ``[B, in_channels, H, W]`` (nominally 32x32; any size >= 8 works thanks to the
    global pool), output logits ``[B, num_classes]``.

    Args:
        in_channels: channels of the input image.
        num_classes: number of output logits.
        blocks_per_stage: number of BasicBlocks in each of the four stages.
    """

    input_size: tuple[int, int] = (32, 32)
    stage_widths: tuple[int, int, int, int] = (64, 128, 256, 512)

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        blocks_per_stage: Sequence[int] = (2, 2, 2, 2),
    ) -> None:
        super().__init__()
        if len(blocks_per_stage) != len(self.stage_widths):
            raise InvalidArgument(
                f"blocks_per_stage needs {len(self.stage_widths)} entries, got {list(blocks_per_stage)}"
            )
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
        )
        stages = []
        in_planes = 64
        for i, (planes, n_blocks) in enumerate(zip(self.stage_widths, blocks_per_stage)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n_blocks):
                blocks.append(BasicBlock(in_planes, planes, stride if j == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_channels, H, W]`` -> logits ``[B, num_classes]``."""
        out = self.stem(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(self.pool(out), 1))


class ResNet18(CIFARResNet):
    """CIFAR ResNet-18: BasicBlock stages [2, 2, 2, 2]. ``[B, C, 32, 32]`` -> ``[B, num_classes]``."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__(in_channels=in_channels, num_classes=num_classes, blocks_per_stage=(2, 2, 2, 2))


class ResNet34(CIFARResNet):
    """CIFAR ResNet-34: BasicBlock stages [3, 4, 6, 3]. ``[B, C, 32, 32]`` -> ``[B, num_classes]``."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__(in_channels=in_channels, num_classes=num_classes, blocks_per_stage=(3, 4, 6, 3))
