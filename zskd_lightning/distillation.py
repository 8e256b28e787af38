"""Knowledge distillation of a student from a frozen teacher (on impressions or on real data)."""

from __future__ import annotations

import os
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from zskd_lightning.checks import check_same_classes, probe_num_outputs
from zskd_lightning.errors import InvalidArgument, ZSKDError
from zskd_lightning.files import write_atomic
from zskd_lightning.losses import kd_loss, kd_loss_per_sample, soft_target_kd_loss
from zskd_lightning.optim import SchedulerInterval, configure_optimization
from zskd_lightning.teacher import as_frozen_teacher, classifier_layer
from zskd_lightning.weighting import SampleWeighting

TargetSource = Literal["teacher", "batch"]


class DistillationModule(L.LightningModule):
    """Train ``student`` to match a frozen ``teacher``.

    Loss per batch ``(x [B, C, H, W], y)``:
    ``kd_weight * T^2 * KL(softmax(teacher(x)/T) || softmax(student(x)/T))`` (batch-mean), plus
    ``ce_weight * CE(student(x), y)`` when ``y`` holds hard labels (int ``[B]``). Batches of impressions carry
    soft targets (float ``[B, num_classes]``) instead, which never count as labels.

    The teacher is queried on exactly the batch the student sees, so augmentation applied by the data
    (e.g. :class:`~zskd_lightning.ImpressionDataModule`'s ``augmentation``) is re-labelled by the teacher, as in
    the ZSKD authors' training. ``target_source="batch"`` instead distils to the soft targets the batch carries
    (no teacher query).

    Logs ``train/loss``; ``val/agreement`` and ``test/agreement`` (student argmax == teacher argmax) always;
    ``val/acc``, ``test/acc`` and ``test/teacher_acc`` when the evaluation data has labels.

    Args:
        teacher: any classifier module; wrapped in :class:`~zskd_lightning.FrozenTeacher` (frozen in place).
        student: the module to train.
        temperature: distillation temperature ``T`` (ZSKD: 20).
        kd_weight / ce_weight: weights of the KD and hard-label cross-entropy terms.
        sample_weights: per-sample weights of the KD term (e.g. a method's modulating function): the loss
            becomes ``kd_weight * mean_i(w_i * l_i)`` with ``l_i`` sample ``i``'s ``T^2 * KL``. ``None``: the
            batch-mean KD loss, exactly as without the option.
        export_filename: after ``fit``, rank 0 writes the student's plain ``state_dict`` to this file in the
            run's log folder (``None`` disables). The teacher's weights are never part of it.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        temperature: float = 20.0,
        kd_weight: float = 1.0,
        ce_weight: float = 0.0,
        target_source: TargetSource = "teacher",
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: SchedulerInterval = "epoch",
        sample_weights: SampleWeighting | None = None,
        export_filename: str | None = "student.pt",
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise InvalidArgument(f"temperature must be > 0, got {temperature}")
        self.save_hyperparameters(ignore=["teacher", "student", "optimizer", "lr_scheduler", "sample_weights"])
        self.sample_weights = sample_weights
        self.teacher = as_frozen_teacher(teacher)
        self.student = student
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        num_classes = classifier_layer(student).out_features
        check_same_classes(self.teacher.num_classes, num_classes)
        metric = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc, self.val_agreement = metric.clone(), metric.clone()
        self.test_acc, self.test_agreement, self.test_teacher_acc = metric.clone(), metric.clone(), metric.clone()

    # ----------------------------------------------------------------------------------------- checks
    def setup(self, stage: str) -> None:
        input_shape = getattr(self.trainer.datamodule, "input_shape", None) if self._trainer else None
        if input_shape is not None:
            check_same_classes(
                probe_num_outputs(self.teacher, tuple(input_shape), "teacher"),
                probe_num_outputs(self.student, tuple(input_shape), "student"),
            )

    def configure_callbacks(self) -> list[Callback]:
        """The callbacks the datamodule needs (an :class:`~zskd_lightning.ImpressionDataModule` asks for its
        synthesis callback), unless the Trainer already has one of the same type."""
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        wanted = list(getattr(datamodule, "synthesis_callbacks", lambda: [])())
        present = {type(callback) for callback in trainer.callbacks} if trainer is not None else set()
        return [callback for callback in wanted if type(callback) not in present]

    # ---------------------------------------------------------------------------------------- training
    def forward(self, x: Tensor) -> Tensor:
        return self.student(x)

    def on_train_epoch_start(self) -> None:
        self.student.train()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        student_logits = self.student(x)
        if self.hparams.target_source == "teacher":
            with torch.no_grad():
                teacher_logits = self.teacher(x)
            if self.sample_weights is None:
                distill = kd_loss(student_logits, teacher_logits, self.hparams.temperature)
            else:
                weights = self.sample_weights(teacher_logits, student_logits.detach())
                per_sample = kd_loss_per_sample(student_logits, teacher_logits, self.hparams.temperature)
                distill = (weights * per_sample).mean()
        else:
            if not _is_soft_target(y):
                raise ZSKDError("target_source='batch' needs batches of soft targets [B, num_classes]")
            if self.sample_weights is not None:
                raise ZSKDError("sample_weights need the teacher's logits: use target_source='teacher'")
            distill = soft_target_kd_loss(student_logits, y, self.hparams.temperature)
        loss = self.hparams.kd_weight * distill
        if self.hparams.ce_weight and _is_hard_label(y):
            loss = loss + self.hparams.ce_weight * F.cross_entropy(student_logits, y)
        if not torch.isfinite(loss):
            raise ZSKDError(
                f"the distillation loss is not finite ({float(loss)}) at step {self.global_step}, epoch "
                f"{self.current_epoch}: check that the teacher's outputs and the inputs are finite, and lower the lr"
            )
        self.log("train/loss", loss, prog_bar=True)
        return loss

    # -------------------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        student_logits, teacher_logits = self.student(x), self.teacher(x)
        self.val_agreement(student_logits, teacher_logits.argmax(dim=-1))
        self.log("val/agreement", self.val_agreement, prog_bar=True)
        self.log(
            "val/loss", kd_loss(student_logits, teacher_logits, self.hparams.temperature), sync_dist=True
        )
        if _is_hard_label(y):
            self.val_acc(student_logits, y)
            self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        student_logits, teacher_logits = self.student(x), self.teacher(x)
        self.test_agreement(student_logits, teacher_logits.argmax(dim=-1))
        self.log("test/agreement", self.test_agreement)
        if _is_hard_label(y):
            self.test_acc(student_logits, y)
            self.test_teacher_acc(teacher_logits, y)
            self.log("test/acc", self.test_acc)
            self.log("test/teacher_acc", self.test_teacher_acc)

    def predict_step(self, batch, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.student(x).softmax(dim=-1)

    def configure_optimizers(self):
        # Only the student is optimized; the teacher has no trainable parameters.
        return configure_optimization(
            self.student.parameters(), self.optimizer, self.lr_scheduler, self.hparams.scheduler_interval
        )

    # ------------------------------------------------------------------------------------------ export
    def export_student(self, path: str | os.PathLike) -> str:
        """Write the student's plain ``state_dict`` (no teacher, no Lightning wrapping) to ``path``."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.student.state_dict().items()}
        write_atomic(path, lambda handle: torch.save(state, handle))
        return path

    def on_train_end(self) -> None:
        if self.hparams.export_filename and self.trainer.is_global_zero:
            folder = self.trainer.log_dir or self.trainer.default_root_dir
            path = self.export_student(os.path.join(folder, self.hparams.export_filename))
            rank_zero_info(f"Student weights exported to {path}")


def _is_hard_label(y: Tensor) -> bool:
    return isinstance(y, Tensor) and y.ndim == 1 and not y.is_floating_point()


def _is_soft_target(y: Tensor) -> bool:
    return isinstance(y, Tensor) and y.ndim == 2 and y.is_floating_point()
