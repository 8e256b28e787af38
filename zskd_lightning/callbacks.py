"""The callbacks a LightningModule asks the Trainer for (``configure_callbacks``) without doubling its own."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback


def missing_callbacks(trainer: L.Trainer | None, wanted: list[Callback]) -> list[Callback]:
    """The callbacks of ``wanted`` whose type (or a subclass of it) ``trainer`` does not have yet, in order."""
    given = list(trainer.callbacks) if trainer is not None else []
    return [callback for callback in wanted if not any(isinstance(c, type(callback)) for c in given)]
