"""Pictures of impressions: one row per class, read from a complete cache."""

from __future__ import annotations

import os

import numpy as np
import torch
from torchvision.utils import save_image

from zskd_lightning.pixels import to_pixels
from zskd_lightning.impressions.cache import ImpressionCache


def save_impression_grid(
    cache: ImpressionCache,
    path: str,
    input_range: tuple[torch.Tensor, torch.Tensor] | None = None,
    per_class: int = 8,
    upscale_to: int = 32,
) -> str:
    """Write a PNG grid: one row per class, ``per_class`` impressions each, mapped back to pixel values.

    ``input_range`` (per-channel min/max ``[C, 1, 1]`` of the teacher's input space) maps impressions back to
    [0, 1]; without it each image is min-max scaled. Small images are upscaled (nearest) for visibility.
    """
    labels = np.concatenate(cache.load("labels"))
    inputs = cache.load("inputs")
    chosen = []
    for k in np.unique(labels):
        for index in np.flatnonzero(labels == k)[:per_class]:
            chunk, offset = divmod(int(index), cache.chunk_size)
            chosen.append(torch.from_numpy(np.array(inputs[chunk][offset])))
    images = torch.stack(chosen)
    if input_range is not None:
        images = to_pixels(images, input_range)
    else:
        flat = images.flatten(1)
        low, high = flat.min(1).values.view(-1, 1, 1, 1), flat.max(1).values.view(-1, 1, 1, 1)
        images = (images - low) / (high - low).clamp_min(1e-12)
    if images.shape[-1] < upscale_to:
        images = torch.nn.functional.interpolate(images, scale_factor=upscale_to // images.shape[-1], mode="nearest")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_image(images.clamp(0, 1), path, nrow=per_class, padding=2, pad_value=0.5)
    return path
