"""The replay buffer: a fixed number of synthesized inputs that rounds write and the student samples."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from zskd_lightning.errors import InvalidArgument, ZSKDError


class ReplayBuffer:
    """``capacity`` inputs ``[capacity, *input_shape]`` (float32, CPU) with the class each was made for
    (``labels [capacity]`` int64) and the class the teacher predicts for it (``predicted [capacity]`` int64; the
    label where the writer gave none).

    :meth:`add` writes a round's batch over the oldest entries (a ring: once full, every slot is rewritten once
    before any is rewritten twice); :meth:`write_balanced` keeps the classes balanced and, within a class at its
    share, replaces only entries a new input scores higher than (SSD-KD's partial update); :meth:`replace`
    writes chosen slots. ``len(buffer)`` is the number of filled slots, always the first ``len`` ones. Each entry
    keeps the score it was written with (``scores [capacity]``; 0 from :meth:`add`), decayed by ``decay`` at every
    :meth:`write_balanced`, and a stamp of that write
    (``stamps [capacity]`` int64, unique over the run), so a batch drawn before a round can tell the entries the
    round rewrote since. Identical on every process of an online run.
    """

    def __init__(self, capacity: int, input_shape: Sequence[int]) -> None:
        if capacity < 1:
            raise InvalidArgument(f"the buffer's capacity must be >= 1, got {capacity}")
        self.capacity, self.input_shape = int(capacity), tuple(int(s) for s in input_shape)
        self.inputs = torch.empty(self.capacity, *self.input_shape)
        self.labels = torch.empty(self.capacity, dtype=torch.long)
        self.predicted = torch.empty(self.capacity, dtype=torch.long)
        self.scores = torch.empty(self.capacity)
        self.stamps = torch.empty(self.capacity, dtype=torch.long)  # 0: unfilled (or restored without stamps)
        self.clear()

    def __len__(self) -> int:
        return self.size

    def clear(self) -> None:
        """Empty the buffer (capacity and shape kept), as a new one: no entries, cursor and write count at 0."""
        self.inputs.zero_()
        self.labels.fill_(-1)
        self.predicted.fill_(-1)
        self.scores.zero_()
        self.stamps.zero_()
        self.size = self.cursor = self.written = 0  # filled slots; the next slot add() writes; writes so far

    def _check(self, inputs: Tensor, labels: Tensor, predicted: Tensor | None) -> Tensor:
        """``predicted``, or ``labels`` in its place, once the shapes are checked."""
        if tuple(inputs.shape[1:]) != self.input_shape or labels.shape != inputs.shape[:1] or (
                predicted is not None and predicted.shape != labels.shape):
            raise InvalidArgument(f"the buffer holds inputs {list(self.input_shape)} with one label each; got inputs "
                                  f"{list(inputs.shape)} and labels {list(labels.shape)}"
                                  + ("" if predicted is None else f" (predicted classes {list(predicted.shape)})"))
        return labels if predicted is None else predicted

    def add(self, inputs: Tensor, labels: Tensor, predicted: Tensor | None = None) -> Tensor:
        """Write ``inputs [N, ...]``, ``labels [N]`` (and the teacher's ``predicted [N]`` classes) over the oldest
        slots; returns the slots written ``[N]`` (when ``N > capacity`` only the last ``capacity`` are kept)."""
        predicted = self._check(inputs, labels, predicted)
        inputs, labels, predicted = inputs[-self.capacity:], labels[-self.capacity:], predicted[-self.capacity:]
        slots = (self.cursor + torch.arange(len(inputs))) % self.capacity
        self.replace(slots, inputs, labels, predicted)
        self.cursor = int(slots[-1] + 1) % self.capacity if len(slots) else self.cursor
        return slots

    def write_balanced(self, inputs: Tensor, labels: Tensor, scores: Tensor, num_classes: int,
                       decay: float = 1.0, predicted: Tensor | None = None) -> Tensor:
        """SSD-KD's partial, class-balanced update of ``inputs [N, ...]`` with ``labels [N]`` in
        ``[0, num_classes)``, ``scores [N]`` (and the teacher's ``predicted [N]`` classes); returns the slots written
        ``[M]``, ``M <= N``.

        The scores held are first multiplied by ``decay`` (older entries lose their claim). Then the new inputs, best
        score first: an input of class ``c`` below its share (``capacity / num_classes``) takes a free slot, or once
        the buffer is full the lowest-scored entry of the most-held class ``m`` when moving one slot from ``m`` to
        ``c`` evens them out (``m`` holds at least two more). Otherwise it competes with the lowest-scored entry of
        ``c`` (of ``m`` while ``c`` holds none) and replaces it only with a higher score. So a round updates part of
        the buffer, and no class ever holds more than ``ceil(capacity / num_classes)``, whether or not the capacity
        divides evenly.
        """
        predicted = self._check(inputs, labels, predicted)
        if len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < num_classes):
            raise InvalidArgument(f"labels written to the buffer must be in [0, {num_classes}), got "
                                  f"{int(labels.min())}..{int(labels.max())}")
        self.scores[: self.size] *= decay
        counts = self.class_counts(num_classes)
        share = self.capacity / num_classes
        written = []
        for i in torch.argsort(scores, descending=True, stable=True).tolist():
            label, score = int(labels[i]), float(scores[i])
            if counts[label] < share and self.size < self.capacity:
                slot = self.size
            else:
                most = int(counts.argmax())
                evens_out = counts[label] < share and counts[most] > counts[label] + 1
                victim = most if evens_out or counts[label] == 0 else label
                candidates = torch.nonzero(self.labels == victim).flatten()
                slot = int(candidates[self.scores[candidates].argmin()])
                if not evens_out and not score > float(self.scores[slot]):
                    continue
                counts[victim] -= 1
            counts[label] += 1
            self.replace(torch.tensor([slot]), inputs[i: i + 1], labels[i: i + 1], predicted[i: i + 1])
            self.scores[slot] = score
            written.append(slot)
        return torch.tensor(written, dtype=torch.long)

    def replace(self, slots: Tensor, inputs: Tensor, labels: Tensor, predicted: Tensor | None = None) -> None:
        """Write ``inputs``/``labels`` (and ``predicted``; else the labels) into ``slots [N]`` (int64, each below
        ``capacity``, filled or the next free); their scores become 0."""
        predicted = self._check(inputs, labels, predicted)
        slots = slots.long().cpu()
        if len(slots) and (int(slots.min()) < 0 or int(slots.max()) >= self.capacity):
            raise InvalidArgument(f"buffer slots must be in [0, {self.capacity}), got {int(slots.min())}..{int(slots.max())}")
        self.inputs[slots] = inputs.detach().float().cpu()
        self.labels[slots] = labels.long().cpu()
        self.predicted[slots] = predicted.long().cpu()
        self.scores[slots] = 0.0
        self.stamps[slots] = self.written + 1 + torch.arange(len(slots))
        self.size = max(self.size, int(slots.max()) + 1) if len(slots) else self.size
        self.written += len(slots)

    def class_counts(self, num_classes: int) -> Tensor:
        """How many filled slots were made for each class (their labels), ``[num_classes]`` int64."""
        return torch.bincount(self.labels[: self.size], minlength=num_classes)

    def predicted_counts(self, num_classes: int) -> Tensor:
        """How many filled slots the teacher predicts as each class, ``[num_classes]`` int64."""
        return torch.bincount(self.predicted[: self.size], minlength=num_classes)

    def state_dict(self) -> dict[str, Any]:
        return {"inputs": self.inputs[: self.size].clone(), "labels": self.labels[: self.size].clone(),
                "predicted": self.predicted[: self.size].clone(),
                "scores": self.scores[: self.size].clone(), "stamps": self.stamps[: self.size].clone(),
                "capacity": self.capacity, "cursor": self.cursor, "written": self.written}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        inputs, labels = state["inputs"], state["labels"]
        if state["capacity"] != self.capacity or tuple(inputs.shape[1:]) != self.input_shape:
            raise ZSKDError(f"the checkpoint's replay buffer holds {state['capacity']} inputs "
                            f"{list(inputs.shape[1:])}, this run's {self.capacity} inputs {list(self.input_shape)}")
        self.size = len(inputs)
        self.inputs[: self.size] = inputs
        self.labels[: self.size] = labels
        self.predicted[: self.size] = state.get("predicted", labels)  # older checkpoints: the labels
        self.scores[: self.size] = state.get("scores", torch.zeros(self.size))
        self.stamps[: self.size] = state.get("stamps", torch.zeros(self.size, dtype=torch.long))
        self.inputs[self.size :], self.labels[self.size :], self.scores[self.size :] = 0.0, -1, 0.0  # unfilled
        self.predicted[self.size :] = -1
        self.stamps[self.size :] = 0
        self.cursor, self.written = int(state["cursor"]), int(state["written"])
