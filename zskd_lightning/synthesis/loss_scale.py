"""Dynamic loss scaling for synthesis under float16 autocast (a Trainer's ``precision: 16-mixed``).

Lightning scales the student's loss under ``16-mixed``; synthesis takes its own gradients (of inputs, or of a
generator's weights) inside callbacks, where nothing does. In float16 a small gradient flushes to zero on its
way back through the teacher, and an input or a generator stops moving without an error. :class:`LossScale`
multiplies the loss by a power of two before the backward pass and divides the gradients by it after (exact in
floating point), as ``torch.amp.GradScaler`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import Tensor

from zskd_lightning.errors import ZSKDError

Extra = TypeVar("Extra")


def autocasts_to_float16(autocast: Callable, device: torch.device | str) -> bool:
    """Whether the context ``autocast()`` runs ``device``'s operations in float16."""
    device_type = torch.device(device).type
    with autocast():
        return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16


class LossScale:
    """Gradients of a loss taken under float16 autocast, kept from underflowing.

    :meth:`backward` calls ``compute(scale)``, which runs the forward pass and returns the gradients of
    ``scale * loss`` (and anything else it wants back); they come back divided by ``scale``. Gradients that are
    not finite (the scaled loss overflowed) are computed again at half the scale: the step is retried, never
    skipped, so a synthesis takes exactly its number of steps. After ``growth_interval`` finite steps in a row
    the scale doubles. Disabled (``compute(1.0)``, no check) outside float16. Under DDP, ``compute`` must
    average the gradients across ranks before returning them, so every rank retries alike.

    Args:
        enabled: scale at all (see :meth:`for_autocast`).
        init_scale: the first scale (default :attr:`INIT_SCALE`).
        growth_interval: finite steps in a row before the scale doubles.
    """

    #: the first scale when none is given (GradScaler's default).
    INIT_SCALE = 2.0 ** 16
    #: below this the scale cannot be what makes gradients non-finite: the loss itself is not finite.
    MIN_SCALE = 2.0 ** -24

    def __init__(self, enabled: bool, init_scale: float | None = None, growth_interval: int = 2000) -> None:
        self.enabled = enabled
        self.scale = float(init_scale if init_scale is not None else self.INIT_SCALE) if enabled else 1.0
        self.growth_interval = growth_interval
        self._finite_steps = 0

    @classmethod
    def for_autocast(cls, autocast: Callable, device: torch.device | str) -> LossScale:
        """Enabled when ``autocast()`` runs ``device``'s operations in float16."""
        return cls(autocasts_to_float16(autocast, device))

    def backward(self, compute: Callable[[float], tuple[Sequence[Tensor], Extra]],
                 before_retry: Callable[[], None] | None = None) -> tuple[list[Tensor], Extra]:
        """``(gradients, extra)`` of ``compute(scale)``, the gradients unscaled. ``before_retry`` undoes what a
        forward pass changed (e.g. BatchNorm running statistics) before a step is computed again."""
        if not self.enabled:
            grads, extra = compute(1.0)
            return list(grads), extra
        while True:
            grads, extra = compute(self.scale)
            if all(bool(torch.isfinite(g).all()) for g in grads):
                break
            self.scale /= 2.0
            self._finite_steps = 0
            if self.scale < self.MIN_SCALE:
                raise ZSKDError("synthesis gradients are not finite at any loss scale under float16 autocast: "
                                "the loss itself is not finite (try precision '32-true' or 'bf16-mixed')")
            if before_retry is not None:
                before_retry()
        used = self.scale
        self._finite_steps += 1
        if self._finite_steps >= self.growth_interval:  # for the next step
            self.scale *= 2.0
            self._finite_steps = 0
        return [g / used for g in grads], extra

    def state_dict(self) -> dict:
        """``{"scale", "finite_steps"}``: where the scale is (for a run's checkpoints)."""
        return {"scale": self.scale, "finite_steps": self._finite_steps}

    def load_state_dict(self, state: dict) -> None:
        if self.enabled:
            self.scale, self._finite_steps = float(state["scale"]), int(state["finite_steps"])
