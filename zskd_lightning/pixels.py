"""The teacher's input space: its input shape, its normalization, and the one formula for its valid range.

An input range is per-channel ``(low, high)``, each ``[C, 1, 1]``: where pixel values 0 (black) and 1 (white)
land after the teacher's normalization ``(pixel - mean) / std``. ``None`` means unknown: the inputs are taken as
the pixels (identity).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from zskd_lightning.errors import InvalidArgument

InputRange = tuple[Tensor, Tensor]


def valid_range(mean: Sequence[float], std: Sequence[float]) -> InputRange:
    """``((0 - mean) / std, (1 - mean) / std)`` per channel, each ``[C, 1, 1]`` float32: the one formula."""
    mean_t = torch.tensor([float(m) for m in mean], dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor([float(s) for s in std], dtype=torch.float32).view(-1, 1, 1)
    return (0 - mean_t) / std_t, (1 - mean_t) / std_t


@dataclass(frozen=True)
class InputSpec:
    """What the teacher takes: ``shape`` ``(C, H, W)`` and, when known, the per-channel ``mean``/``std`` of its
    normalization of pixel values in [0, 1]. Without a normalization the valid range is unknown (``None``)."""

    shape: tuple[int, ...]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if (self.mean is None) != (self.std is None):
            raise InvalidArgument("input mean and std go together: give both or neither")
        if self.mean is not None:
            if len(self.shape) != 3:
                raise InvalidArgument(f"input_mean/input_std normalize images of shape (C, H, W); the input shape is "
                                      f"{self.shape}: for inputs that are not images give neither (nor eval_data "
                                      "with a normalization, which the datamodule would take them from)")
            object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
            object.__setattr__(self, "std", tuple(float(s) for s in self.std))
            channels = self.shape[0] if self.shape else None
            if not len(self.mean) == len(self.std) == channels:
                raise InvalidArgument(
                    f"input_mean/input_std need one value per channel: {channels} channels, "
                    f"got {len(self.mean)} and {len(self.std)}"
                )
            if any(s <= 0 for s in self.std):
                raise InvalidArgument(f"input_std must be > 0 in every channel, got {list(self.std)}")
            if any(not 0.0 <= m <= 1.0 for m in self.mean) or any(s > 1.0 for s in self.std):
                raise InvalidArgument(
                    f"input_mean/input_std are of pixel values in [0, 1] (e.g. CIFAR-10's mean 0.4914, 0.4822, "
                    f"0.4465), got mean {list(self.mean)} and std {list(self.std)}: divide 0-255 statistics by 255"
                )

    def valid_range(self) -> InputRange | None:
        """The per-channel ``(low, high)`` of :func:`valid_range`, or ``None`` without a normalization."""
        return None if self.mean is None else valid_range(self.mean, self.std)

    def describe(self) -> dict[str, Any]:
        """JSON form (part of an impression cache's identity)."""
        return {"shape": list(self.shape), "mean": None if self.mean is None else list(self.mean),
                "std": None if self.std is None else list(self.std)}


def _bounds(like: Tensor, input_range: InputRange) -> tuple[Tensor, Tensor]:
    low, high = input_range
    return low.to(like.device, like.dtype), high.to(like.device, like.dtype)


def to_pixels(inputs: Tensor, input_range: InputRange | None) -> Tensor:
    """Inputs ``[..., C, H, W]`` in the teacher's space -> pixel values (0 = black, 1 = white; not clamped)."""
    if input_range is None:
        return inputs
    low, high = _bounds(inputs, input_range)
    return (inputs - low) / (high - low)


def from_pixels(pixels: Tensor, input_range: InputRange | None) -> Tensor:
    """Inverse of :func:`to_pixels`."""
    if input_range is None:
        return pixels
    low, high = _bounds(pixels, input_range)
    return low + (high - low) * pixels


def pixel_noise(shape: Sequence[int], mean: float, std: float, generator: torch.Generator) -> Tensor:
    """Pixel values ``[*shape]`` from ``N(mean, std)`` clamped to [0, 1] (float32, CPU), drawn from ``generator``."""
    return (torch.randn(tuple(shape), generator=generator) * std + mean).clamp_(0.0, 1.0)
