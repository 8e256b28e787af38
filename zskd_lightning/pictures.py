"""Labelled pictures of input batches: one row per class, for people to look at (PNG files and loggers)."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor
from torchvision.utils import make_grid

from zskd_lightning.errors import described
from zskd_lightning.files import write_atomic
from zskd_lightning.pixels import to_pixels


def labelled_grid(
    inputs: Tensor,
    labels: Tensor | np.ndarray,
    input_range: tuple[Tensor, Tensor] | None = None,
    per_class: int = 8,
    min_size: int = 64,
) -> Image.Image:
    """A labelled grid of ``inputs [N, C, H, W]`` (the teacher's input space) by their class ``labels [N]``: one
    row per class present (its label on the left), its first ``per_class`` inputs, mapped back to pixel values
    and enlarged (nearest neighbour, a whole factor) until each image is at least ``min_size`` px.

    ``input_range`` (per-channel min/max ``[C, 1, 1]`` of the teacher's input space) maps inputs back to
    [0, 1]; without it each image is min-max scaled.
    """
    labels = np.asarray(labels)
    rows = [int(k) for k in np.unique(labels)]
    cells: dict[int, torch.Tensor] = {}  # grid position -> input
    for row, k in enumerate(rows):
        for column, index in enumerate(np.flatnonzero(labels == k)[:per_class]):
            cells[row * per_class + column] = inputs[int(index)].float()
    images = torch.stack(list(cells.values()))
    if input_range is not None:
        images = to_pixels(images, input_range)
    else:
        flat = images.flatten(1)
        low, high = flat.min(1).values.view(-1, 1, 1, 1), flat.max(1).values.view(-1, 1, 1, 1)
        images = (images - low) / (high - low).clamp_min(1e-12)
    # a class with fewer inputs leaves gray cells, which keep the rows aligned
    grid_cells = torch.full((len(rows) * per_class, *images.shape[1:]), 0.5)
    grid_cells[list(cells)] = images.clamp(0, 1)
    images = grid_cells
    factor = max(1, math.ceil(min_size / max(images.shape[-2:])))
    if factor > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest")
    grid = make_grid(images, nrow=per_class, padding=2, pad_value=0.5)  # [3 or C, H, W]
    pixels = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    picture = Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).convert("RGB")
    margin = 72
    labelled = Image.new("RGB", (picture.width + margin, picture.height), (255, 255, 255))
    labelled.paste(picture, (margin, 0))
    draw = ImageDraw.Draw(labelled)
    cell = images.shape[-2] + 2
    for row, label in enumerate(rows):
        draw.text((6, row * cell + cell // 2 - 6), f"class {label}", fill=(0, 0, 0))
    return labelled


def save_picture(picture: Image.Image, path: str) -> str:
    """Write ``picture`` as a PNG at ``path`` (atomically); returns the path."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_atomic(path, lambda handle: picture.save(handle, format="PNG"))
    return path


def log_picture(loggers: Sequence[Any], tag: str, picture: Image.Image, step: int = 0) -> None:
    """Send ``picture`` to every logger that takes images: TensorBoard's ``add_image``, or a ``log_image`` method
    (Weights & Biases, Neptune, ...); others (CSV) are skipped."""
    for logger in loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image(tag, np.asarray(picture), global_step=step, dataformats="HWC")
        elif callable(getattr(logger, "log_image", None)):
            logger.log_image(key=tag, images=[picture], step=step)


def publish_picture(make: Callable[[], Image.Image], path: str, loggers: Sequence[Any], tag: str,
                    step: int = 0) -> str | None:
    """Draw ``make()``, write it as a PNG at ``path`` and send it to ``loggers`` under ``tag``; returns the path
    (``None`` if it was not written). Each failure (a full disk, a logger's upload) is a warning, not an error:
    this runs on global rank 0 alone while the other ranks go on, and an error raised there would leave them
    waiting in their next collective."""
    try:
        picture = make()
        save_picture(picture, path)
    except Exception as err:
        warnings.warn(f"the {tag} picture was not written to {path}: {described(err)}", stacklevel=2)
        return None
    try:
        log_picture(loggers, tag, picture, step=step)
    except Exception as err:
        warnings.warn(f"the {tag} picture ({path}) did not reach the loggers: {described(err)}", stacklevel=2)
    return path
