"""Pictures of impressions: one row per class, read from a complete cache."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from zskd_lightning.impressions.cache import ImpressionCache
from zskd_lightning.impressions.shards import ShardReader
from zskd_lightning.pictures import labelled_grid, save_picture


def impression_grid(
    cache: ImpressionCache,
    input_range: tuple[torch.Tensor, torch.Tensor] | None = None,
    per_class: int = 8,
    min_size: int = 64,
) -> Image.Image:
    """:func:`~zskd_lightning.pictures.labelled_grid` of a complete cache: the first ``per_class`` impressions of
    each class, by the class they were made for. Reads the labels chunk by chunk and the chosen inputs' rows
    alone, holding no file open between reads (a cache may have thousands of chunks)."""
    labels = np.concatenate([np.load(cache.chunk_file(c, "labels")) for c in range(cache.num_chunks)])[: cache.count]
    chosen = np.concatenate([np.flatnonzero(labels == k)[:per_class] for k in np.unique(labels)])
    shards = ShardReader(max_mapped=0)
    images = torch.stack([torch.from_numpy(shards.row(cache.chunk_file(i // cache.chunk_size, "inputs"),
                                                      i % cache.chunk_size)) for i in chosen.tolist()])
    return labelled_grid(images, labels[chosen], input_range, per_class, min_size)


def save_impression_grid(cache: ImpressionCache, path: str,
                         input_range: tuple[torch.Tensor, torch.Tensor] | None = None, per_class: int = 8) -> str:
    """Write :func:`impression_grid` as a PNG at ``path``; returns the path."""
    return save_picture(impression_grid(cache, input_range, per_class), path)


