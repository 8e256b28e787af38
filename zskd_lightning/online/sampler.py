"""Buffer samplers: which replay-buffer entries each training batch draws, and how much each counts.

A sampler draws slot indices from a seeded ``torch.Generator`` and may return importance weights for the
per-sample distillation loss. Samplers that learn from the losses (SSD-KD's priority sampler) set
``wants_losses``: the online driver then hands them every step's per-sample KD losses, gathered from all
processes, so their state is identical everywhere.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from zskd_lightning.describe import Recorded
from zskd_lightning.errors import ZSKDError


class UniformSampler(Recorded):
    """Uniform sampling with replacement (the FastDFKD family's): every filled slot equally likely, no weights.

    The base of every sampler: subclasses override :meth:`draw` and, when they learn from losses, :meth:`update`
    and :meth:`written` (and :meth:`plan` when they change over the fit).
    """

    wants_losses: bool = False

    def setup(self, capacity: int) -> None:
        """Start afresh for an empty buffer of ``capacity`` entries (the datamodule's constructor, and each new
        fit; a resumed fit then loads its state)."""

    def plan(self, batches: int | None) -> None:
        """The fit's length: the training batches each process will draw in all (``None``: a fit without an
        end), told at the start of every fit, a resumed one included."""

    def draw(self, size: int, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """``(slots [batch_size] int64 in [0, size), weights [batch_size] float32 or None)``."""
        return torch.randint(0, size, (batch_size,), generator=generator), None

    def written(self, slots: Tensor) -> None:
        """Slots a round has just (re)written."""

    def update(self, slots: Tensor, losses: Tensor) -> None:
        """Per-sample distillation losses ``[M]`` of the entries ``slots [M]`` a step used (all processes)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:  # a subclass's state (priorities): this sampler would drop it
            raise ZSKDError(f"the checkpoint's replay buffer was drawn by a sampler with a state ({sorted(state)}, "
                            f"e.g. PrioritySampler's priorities): resume it with that sampler, not {type(self).__name__}")

