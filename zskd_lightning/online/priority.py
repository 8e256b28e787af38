"""Prioritized replay (Schaul, Quan, Antonoglou, Silver; ICLR 2016) over the replay buffer, as SSD-KD samples it.

Entry ``i`` has priority ``p_i = l_i + eps``, ``l_i`` its last per-sample distillation loss: ``T^2 *
KL(p_T(x) || p_S(x))`` (T^2 nats) on the input as the student saw it, i.e. after the data's batch augmentation
(a blend with another entry under ``mix``), not on the stored entry alone. It is drawn with probability
``P(i) = p_i^alpha / sum_k p_k^alpha``; a draw carries the importance weight ``w_i = (N P(i))^-beta / max_j w_j``
for the per-sample distillation loss (the max over the batch this rank drew: under DDP each rank normalizes its
own), with ``beta`` annealed linearly to 1. Entries a round has just written get the
largest priority seen so far, so each is drawn soon and gets a real one.

A sum tree holds the ``p_i^alpha``: drawing ``B`` entries and updating ``B`` priorities are ``O(B log N)``,
vectorised over the batch (``benchmarks/priority_sampling.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from zskd_lightning.errors import InvalidArgument, ZSKDError
from zskd_lightning.online.sampler import UniformSampler


class SumTree:
    """A complete binary tree over ``capacity`` leaves whose internal nodes hold the sums of their children.

    Leaves are float64 values ``>= 0``; ``total`` is their sum; :meth:`find` maps values in ``[0, total)`` to the
    leaf whose prefix-sum interval holds them (vectorised).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise InvalidArgument(f"a sum tree needs capacity >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.leaves = 1 << max(0, (self.capacity - 1).bit_length())  # a power of two >= capacity
        self.nodes = np.zeros(2 * self.leaves, dtype=np.float64)  # node 1 is the root; leaf i is node leaves + i

    @property
    def total(self) -> float:
        return float(self.nodes[1])

    def values(self) -> np.ndarray:
        """The ``capacity`` leaf values (a copy)."""
        return self.nodes[self.leaves: self.leaves + self.capacity].copy()

    def set(self, indices: np.ndarray, values: np.ndarray) -> None:
        """Set leaves ``indices [M]`` to ``values [M]`` (the last wins for repeated indices) and refresh sums."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size == 0:
            return
        # numpy leaves unspecified which of repeated indices an assignment keeps: keep each one's last value here
        unique, last_from_end = np.unique(indices[::-1], return_index=True)
        nodes = unique + self.leaves
        self.nodes[nodes] = np.asarray(values, dtype=np.float64)[::-1][last_from_end]
        nodes = np.unique(nodes // 2)
        while nodes[0] >= 1:  # level by level up to the root (node 1); node 0 is unused
            self.nodes[nodes] = self.nodes[2 * nodes] + self.nodes[2 * nodes + 1]
            nodes = np.unique(nodes // 2)

    def find(self, targets: np.ndarray) -> np.ndarray:
        """Leaf index for each value in ``targets [M]`` (each in ``[0, total)``): the ``i`` with
        ``sum_{k<i} v_k <= t < sum_{k<=i} v_k``."""
        nodes = np.ones(len(targets), dtype=np.int64)
        remaining = np.asarray(targets, dtype=np.float64).copy()
        while nodes[0] < self.leaves:
            left = 2 * nodes
            go_right = remaining >= self.nodes[left]
            remaining -= np.where(go_right, self.nodes[left], 0.0)
            nodes = left + go_right
        return np.minimum(nodes - self.leaves, self.capacity - 1)


class PrioritySampler(UniformSampler):
    """SSD-KD's sampler: prioritized replay with importance weights (module docstring).

    Args:
        alpha: how much priorities count (0: uniform).
        beta: the importance-weight exponent at the start, annealed linearly to 1 over ``beta_steps`` draws.
        beta_steps: draws (training batches, not optimizer steps under gradient accumulation) over which
            ``beta`` reaches 1; ``None`` (default): the whole fit, as Schaul et al. anneal it to 1 at the end of
            learning (the Trainer's training batches per process, counted at each fit's start; a fit without an
            end keeps ``beta``, with a warning).
        eps: added to every loss (T^2 nats, the loss's units) so no entry's probability is 0.
    """

    wants_losses = True

    def __init__(self, alpha: float = 0.6, beta: float = 0.4, beta_steps: int | None = None,
                 eps: float = 1e-3) -> None:
        if alpha < 0 or not 0 <= beta <= 1 or (beta_steps is not None and beta_steps < 1) or eps <= 0:
            raise InvalidArgument(f"need alpha >= 0, 0 <= beta <= 1, beta_steps >= 1 (or None: the fit), eps > 0; "
                                  f"got alpha={alpha}, beta={beta}, beta_steps={beta_steps}, eps={eps}")
        self.alpha, self.beta, self.eps = float(alpha), float(beta), float(eps)
        self.beta_steps = None if beta_steps is None else int(beta_steps)
        self.fit_batches: int | None = None  # told by plan() at each fit's start
        self.tree: SumTree | None = None
        self.max_priority = 1.0
        self.draws = 0

    def setup(self, capacity: int) -> None:
        """A new tree for a buffer of ``capacity`` entries (empty slots have priority 0), beta's annealing and the
        largest priority back at their start."""
        self.tree = SumTree(capacity)
        self.max_priority, self.draws = 1.0, 0

    def _tree(self) -> SumTree:
        if self.tree is None:
            raise InvalidArgument("call PrioritySampler.setup(capacity) first (OnlineDataModule does)")
        return self.tree

    def plan(self, batches: int | None) -> None:
        """Anneal over ``batches`` draws when ``beta_steps`` is ``None`` (warns for a fit without an end). A
        resumed fit of another length anneals from the draws it made to 1 at its new end: beta steps to
        ``draws / (batches - 1)`` of the way there at the resume (down, for a longer fit)."""
        self.fit_batches = batches
        if self.beta_steps is None and batches is None:
            rank_zero_warn("PrioritySampler anneals beta over the fit, and the trainer gives it no known number of "
                           f"batches (no max_epochs or max_steps, or none to train): beta stays {self.beta}; give "
                           "beta_steps to anneal it")

    @property
    def current_beta(self) -> float:
        """``beta`` after :attr:`draws` draws: linear to 1 over ``beta_steps`` draws, or over the fit's batches
        (1 at its last batch, whose weights come after ``batches - 1`` draws)."""
        if self.beta_steps is not None:
            span = self.beta_steps
        elif self.fit_batches is None:  # no fit told yet, or one without an end
            return self.beta
        elif self.fit_batches <= 1:  # a fit of one batch: at its end
            return 1.0
        else:
            span = self.fit_batches - 1
        return min(1.0, self.beta + (1.0 - self.beta) * self.draws / span)

    def probabilities(self, size: int) -> Tensor:
        """``P(i)`` of the first ``size`` entries, ``[size]`` float64; uniform while none has a priority (as
        :meth:`draw` samples then)."""
        if size < 1:
            raise InvalidArgument(f"probabilities of the first {size} entries: size must be >= 1")
        values = self._tree().values()[:size]
        total = values.sum()
        return torch.from_numpy(values / total if total > 0 else np.full(len(values), 1.0 / len(values)))

    def draw(self, size: int, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """Stratified draw: the total mass is cut into ``batch_size`` equal segments and one entry is drawn from
        each (Schaul et al.), so a batch spreads over the distribution; returns slots and importance weights."""
        tree = self._tree()
        total = tree.total
        if total <= 0:  # nothing prioritized yet (a fresh buffer restored without priorities): uniform
            return super().draw(size, batch_size, generator)
        uniform = torch.rand(batch_size, generator=generator, dtype=torch.float64).numpy()
        targets = (np.arange(batch_size) + uniform) * (total / batch_size)
        slots = torch.from_numpy(np.minimum(tree.find(np.minimum(targets, np.nextafter(total, 0))), size - 1))
        weights = self.importance_weights(slots, size)
        self.draws += 1
        return slots, weights

    def importance_weights(self, slots: Tensor, size: int) -> Tensor:
        """``w_i = (N P(i))^-beta / max_j w_j`` over the batch ``slots [B]`` of a buffer of ``size`` (``N``),
        at the current ``beta``; ``[B]`` float32."""
        tree = self._tree()
        probability = tree.nodes[slots.numpy() + tree.leaves] / tree.total
        weights = (size * np.maximum(probability, 1e-300)) ** (-self.current_beta)
        return torch.from_numpy(weights / weights.max()).float()

    def written(self, slots: Tensor) -> None:
        """New entries start at the largest priority seen (drawn soon, then given their own)."""
        if len(slots):
            self._tree().set(slots.numpy(), np.full(len(slots), self.max_priority ** self.alpha))

    def update(self, slots: Tensor, losses: Tensor) -> None:
        """``p_i = loss_i + eps`` for the entries just used (losses ``[M]``, all processes; ``M`` may be 0)."""
        if not len(slots):
            return
        priorities = losses.double().clamp_min(0).numpy() + self.eps
        self.max_priority = max(self.max_priority, float(priorities.max()))
        self._tree().set(slots.numpy(), priorities ** self.alpha)

    def state_dict(self) -> dict[str, Any]:
        return {"leaves": None if self.tree is None else torch.from_numpy(self.tree.values()),
                "max_priority": self.max_priority, "draws": self.draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "max_priority" not in state:
            raise ZSKDError(
                "the checkpoint's replay buffer has no priorities (it was drawn by another sampler, e.g. "
                "UniformSampler): resume it with the sampler it was saved with, or start a new fit")
        if state.get("leaves") is not None:
            values = state["leaves"].numpy()
            self.tree = SumTree(len(values))
            self.tree.set(np.arange(len(values)), values)
        self.max_priority, self.draws = float(state["max_priority"]), int(state["draws"])
