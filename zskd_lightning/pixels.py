"""Pixels <-> the teacher's input space, through the valid input range.

An input range is per-channel ``(low, high)``, each ``[C, 1, 1]``: where pixel values 0 (black) and 1 land after
the teacher's normalization. ``None`` means unknown: the inputs are taken as the pixels (identity).
"""

from __future__ import annotations

from torch import Tensor

InputRange = tuple[Tensor, Tensor]


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
