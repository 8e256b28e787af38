"""Optimizer and LR-scheduler wiring shared by the library's LightningModules (configurable from YAML)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from zskd_lightning.errors import InvalidArgument

SchedulerInterval = Literal["epoch", "step"]


def configure_optimization(
    params: Iterable[torch.nn.Parameter],
    optimizer: OptimizerCallable,
    lr_scheduler: LRSchedulerCallable | None,
    interval: SchedulerInterval,
    validation_epochs: int | None = 1,
) -> Any:
    """Return what ``LightningModule.configure_optimizers`` expects: an optimizer, or an optimizer+scheduler dict.

    ``ReduceLROnPlateau`` monitors ``val/loss`` and steps once per validation: every ``validation_epochs`` epochs
    (:func:`validation_epochs`; the Trainer's ``check_val_every_n_epoch``). ``interval="step"``, no validation
    (``0``) or validation by training steps (``None``) refuses it in one line instead of Lightning's error after
    the first step or epoch. A fit handed no validation loader at all still gets Lightning's error.
    """
    opt = optimizer(params)
    if lr_scheduler is None:
        return opt
    scheduler = lr_scheduler(opt)
    config: dict[str, Any] = {"scheduler": scheduler, "interval": interval}
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        if interval == "step":
            raise InvalidArgument("lr_scheduler ReduceLROnPlateau follows val/loss, which is logged once a validation, "
                                  "not every step: use scheduler_interval: epoch")
        if validation_epochs == 0:
            raise InvalidArgument("lr_scheduler ReduceLROnPlateau follows val/loss, and this run has no validation: "
                                  "give the data held-out impressions (num_val_impressions) or validate_on_real, "
                                  "or choose another scheduler")
        if validation_epochs is None:
            raise InvalidArgument("lr_scheduler ReduceLROnPlateau follows val/loss once an epoch, and this run "
                                  "validates by training steps (check_val_every_n_epoch: null): validate every N "
                                  "epochs, or choose another scheduler")
        config["monitor"] = "val/loss"
        config["frequency"] = validation_epochs  # stepped at the end of each epoch that validated
    return {"optimizer": opt, "lr_scheduler": config}


def validation_epochs(module: L.LightningModule) -> int | None:
    """Every how many epochs ``module``'s fit validates: ``0`` when its Trainer's ``limit_val_batches`` is 0 (set so
    by data with nothing to validate on, :class:`~zskd_lightning.data.evaluation.ValidationSwitch`), ``None`` when
    it validates by training steps (``check_val_every_n_epoch: null``), else ``check_val_every_n_epoch``; ``1``
    outside a Trainer."""
    if module._trainer is None:
        return 1
    if module.trainer.limit_val_batches == 0:
        return 0
    return module.trainer.check_val_every_n_epoch
