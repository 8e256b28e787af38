"""Per-class activation statistics of one layer, accumulated in a stream (Lopes, Fenu and Starner, "Data-Free
Knowledge Distillation for Deep Neural Networks", 2017, arXiv 1710.07535: the metadata a teacher's owner records
on the real training set, one pass, grouped by the true class).

Each class keeps ``count``, ``mean`` and the co-moment ``M2 = sum (x - mean)(x - mean)^T`` in float64, updated a
batch at a time with Chan et al.'s pairwise formula (exact up to rounding, no catastrophic cancellation), and
merged the same way across processes. A layer wider than ``max_full_dim`` keeps only the diagonal of ``M2`` (a
full float64 covariance of LeNet-5's 4,704 conv1 values is 177 MB per class).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from zskd_lightning.errors import InvalidArgument, ZSKDError

Kept = Literal["full", "diagonal"]


class ClassMoments:
    """Streaming per-class moments of ``dim``-dimensional vectors.

    Args:
        num_classes: K.
        dim: d, the flattened width of the layer.
        kept: ``"full"`` covariance ``[K, d, d]`` or ``"diagonal"`` variances ``[K, d]``.
    """

    def __init__(self, num_classes: int, dim: int, kept: Kept = "full") -> None:
        if kept not in ("full", "diagonal"):
            raise InvalidArgument(f"kept must be 'full' or 'diagonal', got {kept!r}")
        self.num_classes, self.dim, self.kept = int(num_classes), int(dim), kept
        self.count = torch.zeros(num_classes, dtype=torch.float64)
        self.mean = torch.zeros(num_classes, dim, dtype=torch.float64)
        shape = (num_classes, dim, dim) if kept == "full" else (num_classes, dim)
        self.m2 = torch.zeros(shape, dtype=torch.float64)

    def update(self, values: Tensor, labels: Tensor) -> None:
        """Add ``values [B, ...]`` (flattened to ``[B, d]``) of true classes ``labels [B]``."""
        values = values.detach().reshape(len(values), -1).to("cpu", torch.float64)
        if values.shape[1] != self.dim:
            raise ZSKDError(f"activations of width {values.shape[1]} given to statistics of width {self.dim}")
        labels = labels.detach().to("cpu", torch.int64)
        if len(labels) != len(values):
            raise ZSKDError(f"{len(labels)} labels given with {len(values)} activation rows")
        outside = labels[(labels < 0) | (labels >= self.num_classes)]
        if len(outside):
            raise ZSKDError(f"label {int(outside[0])} outside the statistics' classes 0..{self.num_classes - 1} "
                            "(e.g. -1 for unlabelled samples, or data of another class count)")
        for k in labels.unique().tolist():
            x = values[labels == k]
            mean = x.mean(0)
            centred = x - mean
            m2 = centred.T @ centred if self.kept == "full" else centred.pow(2).sum(0)
            self._merge_class(k, float(len(x)), mean, m2)

    def merge(self, other: ClassMoments) -> None:
        """Fold in ``other`` (the same layer seen by another process), as if its values had been added here."""
        if (other.num_classes, other.dim, other.kept) != (self.num_classes, self.dim, self.kept):
            raise ZSKDError(f"statistics of different shapes cannot be merged: {other.num_classes} classes x width "
                            f"{other.dim} ({other.kept}) into {self.num_classes} x {self.dim} ({self.kept})")
        for k in range(self.num_classes):
            if other.count[k] > 0:
                self._merge_class(k, float(other.count[k]), other.mean[k], other.m2[k])

    def _merge_class(self, k: int, n_b: float, mean_b: Tensor, m2_b: Tensor) -> None:
        n_a = float(self.count[k])
        n = n_a + n_b
        delta = mean_b - self.mean[k]
        self.mean[k] += delta * (n_b / n)
        correction = torch.outer(delta, delta) if self.kept == "full" else delta.pow(2)
        self.m2[k] += m2_b + correction * (n_a * n_b / n)
        self.count[k] = n

    def covariance(self) -> Tensor:
        """Population covariance ``[K, d, d]`` (full) or variances ``[K, d]`` (diagonal), float64."""
        self._require_two()
        shape = (-1, 1, 1) if self.kept == "full" else (-1, 1)
        return self.m2 / self.count.view(shape)

    def std(self) -> Tensor:
        """Per-unit population standard deviation ``[K, d]``, float64."""
        variances = self.covariance()
        diagonal = variances.diagonal(dim1=-2, dim2=-1) if self.kept == "full" else variances
        return diagonal.clamp_min(0).sqrt()

    def _require_two(self) -> None:
        few = [k for k in range(self.num_classes) if self.count[k] < 2]
        if few:
            raise ZSKDError(f"classes {few[:10]} have fewer than 2 recorded samples: their statistics are undefined")
