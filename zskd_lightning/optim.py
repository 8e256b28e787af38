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
    validates: bool = True,
) -> Any:
    """Return what ``LightningModule.configure_optimizers`` expects: an optimizer, or an optimizer+scheduler dict.

    ``ReduceLROnPlateau`` monitors ``val/loss``, once an epoch: ``interval="step"`` or ``validates=False`` (a run
    whose validation is switched off, :func:`validation_runs`) refuses it in one line instead of Lightning's error
    after the first step or epoch. A fit handed no validation loader at all still gets Lightning's error.
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
        if not validates:
            raise InvalidArgument("lr_scheduler ReduceLROnPlateau follows val/loss, and this run has no validation: "
                                  "give the data held-out impressions (num_val_impressions) or validate_on_real, "
                                  "or choose another scheduler")
        config["monitor"] = "val/loss"
    return {"optimizer": opt, "lr_scheduler": config}


def validation_runs(module: L.LightningModule) -> bool:
    """Whether ``module``'s fit has a validation loop: ``False`` when its Trainer's ``limit_val_batches`` is 0 (set
    so by data with nothing to validate on, :class:`~zskd_lightning.data.evaluation.ValidationSwitch`); ``True``
    outside a Trainer."""
    return module._trainer is None or module.trainer.limit_val_batches != 0
