"""The modules' evaluation means (accuracies, losses): exact under DDP, float32 under every precision.

A torchmetrics mean gathers its sum and count from every rank, so uneven evaluation shares
(:mod:`zskd_lightning.data.evaluation`) give the mean over all samples. Two defaults are changed: a NaN value
makes the mean NaN (torchmetrics drops it with a warning, so a diverged batch would vanish from ``val/loss``), and
the states are put back to float32 before each evaluation loop (a '-true' precision's ``module.to(dtype)`` casts
them too, and a bf16 or float16 sum over 10,000 samples rounds or overflows).
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import MeanMetric, Metric

__all__ = ["Float32EvaluationMetrics", "mean_metric", "metrics_in_float32"]


def mean_metric() -> MeanMetric:
    """A per-sample mean (``update(values [B])``, or ``update(batch_mean, weight=B)``) through which NaN passes."""
    return MeanMetric(nan_strategy=float("nan"))


def metrics_in_float32(module: nn.Module) -> None:
    """Every torchmetrics state under ``module`` in float32 (call at the start of an evaluation loop)."""
    for metric in module.modules():
        if isinstance(metric, Metric):  # its ``dtype`` still says float32 after a cast by ``module.to(dtype)``
            metric.set_dtype(torch.float32)


class Float32EvaluationMetrics:
    """LightningModule mixin (list it before ``L.LightningModule``): its metrics float32 at the start of every
    validation and test loop. An override of either hook calls ``super()`` to keep it."""

    def on_validation_start(self) -> None:
        metrics_in_float32(self)

    def on_test_start(self) -> None:
        metrics_in_float32(self)
