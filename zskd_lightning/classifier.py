"""Supervised training on real labelled data: makes teachers and the "student on real data" baselines."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from zskd_lightning.callbacks import missing_callbacks
from zskd_lightning.checks import probe_num_outputs
from zskd_lightning.errors import ZSKDError
from zskd_lightning.hparams import LoadsRecordedSpecs, cli_given_spec, module_valued_init_args
from zskd_lightning.losses import top1_hits
from zskd_lightning.metrics import Float32EvaluationMetrics, mean_metric
from zskd_lightning.optim import SchedulerInterval, configure_optimization, validation_epochs
from zskd_lightning.predictions import writer_unless_present
from zskd_lightning.random_resume import ResumedRandomStreams


class ClassifierModule(LoadsRecordedSpecs, Float32EvaluationMetrics, L.LightningModule):
    """Cross-entropy training of ``network`` on ``(image [B, C, H, W], label [B])`` batches.

    Logs ``train/loss``, ``val/loss``, ``val/acc`` and ``test/acc`` (top-1 accuracy, torchmetrics). Through
    the ``zskd`` CLI the checkpoint records the network's ``class_path``/``init_args`` so that
    :class:`~zskd_lightning.FrozenTeacher` can rebuild it from the checkpoint alone, and
    ``ClassifierModule.load_from_checkpoint(path)`` needs nothing else (the module loaded keeps the spec).

    Args:
        network: the classifier, mapping ``[B, C, H, W]`` to logits ``[B, num_classes]``.
        optimizer: optimizer factory (``class_path`` in YAML), called with the network's parameters.
        lr_scheduler: optional scheduler factory, stepped every ``scheduler_interval``.
        label_smoothing: cross-entropy label smoothing.
    """

    spec_args = ("network",)

    def __init__(
        self,
        network: nn.Module,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: SchedulerInterval = "epoch",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        spec = cli_given_spec("network")
        # a subclass's own networks, unless the CLI built them from a spec (kept, as the network's is)
        modules = [n for n in module_valued_init_args() if n != "network" and cli_given_spec(n) is None]
        self.save_hyperparameters(ignore=["network", "optimizer", "lr_scheduler", *modules])
        if spec is not None:
            self.hparams["network"] = spec
        self.network = network
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.val_acc, self.test_acc = mean_metric(), mean_metric()  # means of top1_hits: no class count needed
        self.val_loss = mean_metric()  # mean per sample

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self._trainer else None
        input_shape = getattr(datamodule, "input_shape", None)
        if input_shape is not None:  # before any step: the network takes the data and has one output a class
            outputs = probe_num_outputs(self.network, tuple(input_shape), "network")
            classes = getattr(datamodule, "num_classes", None)
            if isinstance(classes, int) and outputs != classes:
                raise ZSKDError(f"network {type(self.network).__name__} outputs {outputs} classes, and the data "
                                f"({type(datamodule).__name__}) has {classes}: set the network's num_classes to "
                                f"{classes}")

    def configure_callbacks(self) -> list[Callback]:
        """A :class:`~zskd_lightning.predictions.PredictionWriter` unless the Trainer has a prediction writer, and
        a :class:`~zskd_lightning.random_resume.ResumedRandomStreams` (checkpoints keep every rank's global
        generators: a resumed fit's dropout goes on as an unstopped one's) unless it has one."""
        return writer_unless_present(self._trainer) + missing_callbacks(self._trainer, [ResumedRandomStreams()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.network(x), y, label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.network(x)
        self.val_loss(F.cross_entropy(logits, y), weight=len(y))  # gathered as sum and count: exact under DDP
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.val_acc(top1_hits(logits, y))
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc(top1_hits(self.network(x), y))
        self.log("test/acc", self.test_acc)

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.network(x).float().softmax(dim=-1)  # float32 under '*-true' precision

    def configure_optimizers(self):
        return configure_optimization(self.network.parameters(), self.optimizer, self.lr_scheduler,
                                      self.hparams.scheduler_interval, validation_epochs(self))
