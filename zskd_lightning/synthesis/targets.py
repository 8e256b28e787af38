"""Target samplers: what each impression should make the teacher output."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zskd_lightning.errors import InvalidArgument
from zskd_lightning.synthesis.api import Chunk, ChunkRandomness, SynthesisContext, TargetSampler
from zskd_lightning.teacher import classifier_layer


def class_similarity(teacher: nn.Module, num_classes: int | None = None) -> Tensor:
    """ZSKD class-similarity matrix ``[K, K]`` from the teacher's classification layer ``W [K, D]`` (its last
    ``nn.Linear`` with ``num_classes`` outputs, see :func:`~zskd_lightning.teacher.classifier_layer`).

    Cosine similarity of the class weight vectors, min-max normalized to ``[0, 1]`` over the whole matrix.
    """
    weight = classifier_layer(teacher, num_classes).weight.detach().float().cpu()
    unit = F.normalize(weight, dim=1)
    similarity = unit @ unit.T
    low, high = similarity.min(), similarity.max()
    return (similarity - low) / (high - low).clamp_min(1e-12)


def balanced_classes(indices: Tensor, num_classes: int) -> Tensor:
    """Class of each global impression index: ``index mod K`` (so any run of K indices covers every class once)."""
    return indices.long() % num_classes


def interleaved_groups(indices: Tensor, num_classes: int, num_groups: int) -> Tensor:
    """Group of each global impression index: ``(index // K) mod G``, so consecutive blocks of K impressions (one of
    each class under :func:`balanced_classes`) take the G settings in turn (ZSKD's betas, Wang's sigmas)."""
    return (indices.long() // num_classes) % num_groups


class DirichletTargets(TargetSampler):
    """ZSKD soft targets (Nayak et al., ICML 2019): for class k and scale beta, ``y ~ Dirichlet(beta * S[k] +
    floor)``.

    ``S`` is :func:`class_similarity`. Impression ``i`` gets class ``i mod K`` and beta
    ``betas[(i div K) mod len(betas)]``, so the budget splits evenly over classes and betas (paper: beta 1.0 and
    0.1). ``floor`` keeps every concentration > 0 (the least similar class has similarity 0). The paper's
    concentration is used as is: the authors' code re-normalizes each row, which makes both betas identical; we
    do not. Draws come from the chunk's numpy stream (Gamma variates normalized per row).
    """

    def __init__(self, betas: Sequence[float] = (1.0, 0.1), floor: float = 1e-6) -> None:
        if not betas or any(b <= 0 for b in betas):
            raise InvalidArgument(f"betas must be positive, got {betas}")
        self.betas = [float(b) for b in betas]
        self.floor = float(floor)
        self.similarity: Tensor | None = None

    def setup(self, context: SynthesisContext, rng: ChunkRandomness) -> None:
        self.similarity = class_similarity(context.teacher, context.num_classes)
        if len(self.similarity) == 2:
            warnings.warn("ZSKD's targets with 2 classes are one-hot: min-max normalization maps the 2x2 class "
                          "similarity to the identity, so every Dirichlet draw is its own class (Class Impressions' "
                          "targets); the paper's method needs 3 or more classes to give soft targets", stacklevel=2)

    def concentrations(self, indices: Tensor, num_classes: int) -> Tensor:
        """Dirichlet concentration of each impression, ``[N, K]`` float64."""
        if self.similarity is None:
            raise RuntimeError("DirichletTargets.setup(context, rng) must run before sampling")
        classes = balanced_classes(indices, num_classes)
        betas = torch.tensor(self.betas, dtype=torch.float64)[interleaved_groups(indices, num_classes, len(self.betas))]
        return betas[:, None] * self.similarity.double()[classes] + self.floor

    def sample(self, chunk: Chunk, context: SynthesisContext) -> tuple[Tensor, Tensor]:
        num_classes = context.num_classes
        alpha = self.concentrations(chunk.indices, num_classes).numpy()
        gamma = chunk.rng.numpy.standard_gamma(alpha)
        total = gamma.sum(axis=1, keepdims=True)
        # A row can underflow to all zeros only for absurdly small concentrations; fall back to its mode class.
        probs = np.where(total > 0, gamma / np.where(total > 0, total, 1.0), np.eye(num_classes)[alpha.argmax(1)])
        return torch.from_numpy(probs).float(), balanced_classes(chunk.indices, num_classes)


class OneHotTargets(TargetSampler):
    """Class Impressions targets (Mopuri et al., ECCV 2018): the one-hot vector of class ``index mod K``."""

    def sample(self, chunk: Chunk, context: SynthesisContext) -> tuple[Tensor, Tensor]:
        classes = balanced_classes(chunk.indices, context.num_classes)
        return F.one_hot(classes, context.num_classes).float(), classes
