"""Knowledge distillation of a student from a frozen teacher (on impressions or on real data)."""

from __future__ import annotations

import os
import warnings
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor, nn

from zskd_lightning.callbacks import missing_callbacks
from zskd_lightning.checks import check_same_classes, probe_num_outputs
from zskd_lightning.errors import REPLAY_NEEDS_TEACHER_TARGETS, InvalidArgument, ZSKDError
from zskd_lightning.export import record_path, update_record, write_student
from zskd_lightning.hparams import LoadsRecordedSpecs, cli_given_spec, module_valued_init_args
from zskd_lightning.losses import kd_loss, kd_loss_per_sample, soft_target_kd_loss, top1_hits
from zskd_lightning.metrics import Float32EvaluationMetrics, mean_metric
from zskd_lightning.optim import SchedulerInterval, configure_optimization, validation_epochs
from zskd_lightning.predictions import writer_unless_present
from zskd_lightning.random_resume import ResumedRandomStreams
from zskd_lightning.ranks import raise_together
from zskd_lightning.teacher import as_frozen_teacher, subnormals_flushed
from zskd_lightning.weighting import SampleWeighting

TargetSource = Literal["teacher", "batch"]

#: Checkpoint key of the teacher's reference (file and fingerprint); its weights are not stored.
TEACHER_REFERENCE_KEY = "zskd_teacher"
_TEACHER_PREFIX = "teacher."


class DistillationModule(LoadsRecordedSpecs, Float32EvaluationMetrics, L.LightningModule):
    """Train ``student`` to match a frozen ``teacher``.

    Loss per batch ``(x [B, C, H, W], y)``:
    ``kd_weight * T^2 * KL(softmax(teacher(x)/T) || softmax(student(x)/T))`` (batch-mean), plus
    ``ce_weight * CE(student(x), y)`` when ``y`` holds hard labels (int ``[B]``). Batches of impressions carry
    soft targets (float ``[B, num_classes]``) instead, which never count as labels; replay-buffer batches (dicts,
    :class:`~zskd_lightning.online.OnlineDataModule`) carry no labels either.

    The teacher is queried on exactly the batch the student sees, so augmentation applied by the data
    (e.g. :class:`~zskd_lightning.ImpressionDataModule`'s ``augmentation``) is re-labelled by the teacher, as in
    the ZSKD authors' training. ``target_source="batch"`` instead distils to the soft targets the batch carries
    (no teacher query).

    Logs ``train/loss``; ``val/agreement``, ``val/loss`` (the KD loss on held-out data) and ``test/agreement``
    (student argmax == teacher argmax) always; ``val/acc``, ``test/acc`` and ``test/teacher_acc`` when the
    evaluation data has labels; ``val/real_agreement`` beside ``val/acc`` when real data validates too.

    Args:
        teacher: any classifier module; wrapped in :class:`~zskd_lightning.FrozenTeacher` (frozen in place, with
            its faster kernels and channels-last layout: the same logits up to float rounding).
        student: the module to train.
        temperature: distillation temperature ``T`` (ZSKD: 20).
        kd_weight / ce_weight: weights of the KD and hard-label cross-entropy terms.
        sample_weights: per-sample weights of the KD term (e.g. a method's modulating function): the loss
            becomes ``kd_weight * mean_i(w_i * l_i)`` with ``l_i`` sample ``i``'s ``T^2 * KL``. ``None``: the
            batch-mean KD loss, exactly as without the option.
        export_filename: after ``fit``, rank 0 writes the student's weights to this safetensors file in the run's
            log folder, with a JSON record beside it (architecture, input shape and normalization, classes,
            teacher fingerprint, and the test accuracy once tested); :func:`~zskd_lightning.load_student` reads
            them back. ``None`` disables.

    Checkpoints hold the teacher by reference (its file and fingerprint, key ``"zskd_teacher"``), not its
    weights; loading one checks that the teacher given now has that fingerprint. They also hold every rank's
    global random generators (:class:`~zskd_lightning.random_resume.ResumedRandomStreams`, a callback this module
    adds), which a fit resumed from the checkpoint (``ckpt_path``) puts back at its first training batch: the
    student's dropout goes on as it would have on the same number of processes. The package's loaders draw their
    order and augmentation from keyed streams, not the global one, and resume mid-epoch, so a resumed fit ends as
    an unstopped one would.

    A subclass overriding ``configure_callbacks``, ``setup``, ``on_fit_start``, ``on_save_checkpoint``,
    ``on_load_checkpoint``, ``on_validation_start``, ``on_test_start``, ``on_train_end`` or ``on_test_end`` must
    call ``super()``: the synthesis callback, the random streams' callback, the teacher's fingerprint (taken
    before a ``-true`` precision casts it) and class count, the teacher by reference, the metrics' float32
    states, the student's export and its record's test accuracy live there. Through the ``zskd`` CLI the
    checkpoint also records the teacher's and the student's ``class_path``/``init_args``, so
    ``DistillationModule.load_from_checkpoint(path)`` needs nothing else.
    """

    spec_args = ("teacher", "student")

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
        export_filename: str | None = "student.safetensors",
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise InvalidArgument(f"temperature must be > 0, got {temperature}")
        if target_source not in ("teacher", "batch"):
            raise InvalidArgument(f"target_source must be 'teacher' or 'batch', got {target_source!r}")
        if export_filename is not None and not export_filename.endswith(".safetensors"):
            raise InvalidArgument(f"export_filename must end in .safetensors, got {export_filename!r}")
        # Specs (class_path/init_args) the CLI built teacher and student from are kept; module objects never are
        # (a subclass's own module-valued arguments included).
        modules = [n for n in ["teacher", "student", *module_valued_init_args()] if cli_given_spec(n) is None]
        ignored = ["optimizer", "lr_scheduler", "sample_weights", *dict.fromkeys(modules)]
        self.save_hyperparameters(ignore=ignored)
        self._teacher_fingerprint: str | None = None
        self._exported: str | None = None
        self.sample_weights = sample_weights
        self.last_replay_losses: Tensor | None = None  # the latest replay step's per-sample losses [B]
        self.teacher = as_frozen_teacher(teacher)
        self.student = student
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        # Accuracies as means of (argmax == label): no class count needed before the first batch.
        self.val_acc, self.val_agreement, self.val_real_agreement = mean_metric(), mean_metric(), mean_metric()
        self.test_acc, self.test_agreement, self.test_teacher_acc = mean_metric(), mean_metric(), mean_metric()
        self.val_loss = mean_metric()  # KD loss, mean per sample

    # ----------------------------------------------------------------------------------------- checks
    def setup(self, stage: str) -> None:
        self.teacher_reference()  # fingerprinted now, before a '*-true' precision casts the weights (resume checks it)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        mix = getattr(getattr(datamodule, "batch_augmentation", None), "mix", 0.0)
        if stage == "fit" and mix and (self.hparams.target_source != "teacher" or self.hparams.ce_weight):
            what = (f"target_source={self.hparams.target_source!r}" if self.hparams.target_source != "teacher"
                    else f"ce_weight={self.hparams.ce_weight}")
            raise ZSKDError(f"the data's batch_augmentation blends inputs (mix={mix}) but not the targets the batches "
                            f"carry, which {what} trains on: use target_source='teacher' and ce_weight=0 (the "
                            "teacher labels each blend), or mix=0")
        input_shape = getattr(datamodule, "input_shape", None)
        if input_shape is not None:  # before any long work: both must take the data and agree on the classes
            check_same_classes(
                self.teacher.count_classes(tuple(input_shape)),
                probe_num_outputs(self.student, tuple(input_shape), "student"),
            )

    def configure_callbacks(self) -> list[Callback]:
        """The callbacks the datamodule needs (an :class:`~zskd_lightning.ImpressionDataModule` asks for its
        synthesis callback), unless the Trainer already has one of that type (or a subclass); a
        :class:`~zskd_lightning.predictions.PredictionWriter` unless it has a prediction writer; and a
        :class:`~zskd_lightning.random_resume.ResumedRandomStreams` unless it has one. A subclass that
        overrides this must return ``super().configure_callbacks()`` too."""
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        # the random streams first: their state at a batch's start is taken before that step's online round
        wanted = [ResumedRandomStreams(), *getattr(datamodule, "synthesis_callbacks", lambda: [])()]
        return missing_callbacks(trainer, wanted) + writer_unless_present(trainer)

    # ---------------------------------------------------------------------------------------- training
    def forward(self, x: Tensor) -> Tensor:
        return self.student(x)

    def _silence_the_teachers_eval_mode_warning(self) -> None:
        # Lightning warns about modules in eval mode when training starts; the frozen teacher always is. Silence
        # exactly that count, and only when the teacher's modules are all there are (a student in eval mode still
        # gets the warning).
        teacher_modules = [name for name, _ in self.named_modules() if name == "teacher" or name.startswith("teacher.")]
        others_in_eval = [name for name, m in self.named_modules() if not m.training and name not in teacher_modules]
        if not others_in_eval:
            message = rf"Found {len(teacher_modules)} module\(s\) in eval mode at the start of training"
            warnings.filterwarnings("ignore", message=message, category=PossibleUserWarning)

    def on_fit_start(self) -> None:
        if not self.student.training:  # e.g. from load_student, which returns it in eval mode for inference
            self.student.train()  # submodules a user keeps in eval mode under a training student stay so
        self._silence_the_teachers_eval_mode_warning()

    def training_step(self, batch: tuple[Tensor, Tensor] | dict[str, Tensor], batch_idx: int) -> Tensor | dict:
        if isinstance(batch, dict):
            return self._replay_step(batch)
        x, y = batch
        student_logits = self.student(x)
        if self.hparams.target_source == "teacher":
            with torch.no_grad():
                teacher_logits = self.teacher(x)
            check_same_classes(teacher_logits.shape[-1], student_logits.shape[-1])
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
            if batch_idx == 0:  # once an epoch (a check costs a device sync)
                self._stop_together(_probability_problem(y), "the batch's targets are not probabilities")
            distill = soft_target_kd_loss(student_logits, y, self.hparams.temperature)
        loss = self.hparams.kd_weight * distill
        if self.hparams.ce_weight and _is_hard_label(y):
            loss = loss + self.hparams.ce_weight * F.cross_entropy(student_logits, y)
        self._check_finite(loss)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _replay_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """A replay-buffer batch (:class:`~zskd_lightning.online.BufferBatches`): ``inputs [B, ...]``, ``slots [B]``
        and optional importance ``weights [B]``. Loss ``kd_weight * mean_i(w_i * l_i)`` (``w_i``: the batch's
        weights times ``sample_weights``, 1 without either); returns it with the per-sample ``T^2 * KL`` terms
        ``l_i`` (``"per_sample_loss" [B]``, detached) for the buffer's sampler, also kept as
        ``last_replay_losses`` until the next step (the online driver gives them after the backward)."""
        if self.hparams.target_source != "teacher":
            raise ZSKDError(REPLAY_NEEDS_TEACHER_TARGETS)
        x = batch["inputs"]
        student_logits = self.student(x)
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        check_same_classes(teacher_logits.shape[-1], student_logits.shape[-1])
        per_sample = kd_loss_per_sample(student_logits, teacher_logits, self.hparams.temperature)
        self.last_replay_losses = per_sample.detach()
        weights = batch.get("weights")
        if self.sample_weights is not None:
            modulation = self.sample_weights(teacher_logits, student_logits.detach())
            weights = modulation if weights is None else weights * modulation
        loss = self.hparams.kd_weight * (per_sample.mean() if weights is None else (weights * per_sample).mean())
        self._check_finite(loss)
        self.log("train/loss", loss, prog_bar=True)
        return {"loss": loss, "per_sample_loss": per_sample.detach()}

    def _check_finite(self, loss: Tensor) -> None:
        problem = None
        if not torch.isfinite(loss):
            problem = (f"the distillation loss is not finite ({float(loss)}) at step {self.global_step}, epoch "
                       f"{self.current_epoch}: check that the teacher's outputs and the inputs are finite, and lower "
                       "the lr")
        self._stop_together(problem, "the distillation loss is not finite")

    def _stop_together(self, problem: str | None, what: str) -> None:
        """Raise ``problem`` (one line) if this rank has one, and a line naming ``what`` on every other rank: a
        collective under DDP (every rank calls it at the same step), so that no rank is left waiting in the
        gradient all-reduce for one that stopped. Without a Trainer, this rank alone decides."""
        raise_together(self._trainer.strategy if self._trainer is not None else None, problem,
                       lambda: f"{what} on another rank at step {self.global_step}, epoch {self.current_epoch}: "
                               "that rank's error says why")

    # -------------------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        """The first validation loader gives ``val/agreement`` and ``val/loss`` (and ``val/acc`` if labelled); a
        second, labelled one (real data beside held-out impressions) gives ``val/acc`` and
        ``val/real_agreement``: monitoring only."""
        x, y = batch
        student_logits, teacher_logits = self.student(x), self.teacher(x)
        check_same_classes(teacher_logits.shape[-1], student_logits.shape[-1])
        hits = top1_hits(student_logits, teacher_logits.argmax(dim=-1))
        if dataloader_idx == 0:
            self.val_agreement(hits)
            self.log("val/agreement", self.val_agreement, prog_bar=True, add_dataloader_idx=False)
            loss = kd_loss(student_logits, teacher_logits, self.hparams.temperature)
            self.val_loss(loss, weight=len(x))  # gathered as sum and count: exact under DDP's uneven shares
            self.log("val/loss", self.val_loss, add_dataloader_idx=False)
        else:
            self.val_real_agreement(hits)
            self.log("val/real_agreement", self.val_real_agreement, add_dataloader_idx=False)
        if _is_hard_label(y):
            self.val_acc(top1_hits(student_logits, y))
            self.log("val/acc", self.val_acc, prog_bar=True, add_dataloader_idx=False)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        student_logits, teacher_logits = self.student(x), self.teacher(x)
        check_same_classes(teacher_logits.shape[-1], student_logits.shape[-1])
        self.test_agreement(top1_hits(student_logits, teacher_logits.argmax(dim=-1)))
        self.log("test/agreement", self.test_agreement)
        if _is_hard_label(y):
            self.test_acc(top1_hits(student_logits, y))
            self.test_teacher_acc(top1_hits(teacher_logits, y))
            self.log("test/acc", self.test_acc)
            self.log("test/teacher_acc", self.test_teacher_acc)

    def predict_step(self, batch, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.student(x).float().softmax(dim=-1)  # float32 under '*-true' precision: near-ties kept apart

    def configure_optimizers(self):
        # Only the student is optimized; the teacher has no trainable parameters.
        return configure_optimization(self.student.parameters(), self.optimizer, self.lr_scheduler,
                                      self.hparams.scheduler_interval, validation_epochs(self))

    # ------------------------------------------------------------------------------------- checkpoints
    def teacher_reference(self) -> dict[str, str | None]:
        """``{"checkpoint": path or None, "fingerprint": sha256}`` of the teacher (computed once: it is frozen)."""
        if self._teacher_fingerprint is None:
            self._teacher_fingerprint = self.teacher.fingerprint()
        return {"checkpoint": self.teacher.checkpoint, "fingerprint": self._teacher_fingerprint}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store the teacher by reference: its weights leave the checkpoint, its file and fingerprint enter."""
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(_TEACHER_PREFIX)]:
            del state[key]
        checkpoint[TEACHER_REFERENCE_KEY] = self.teacher_reference()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Check that this module's teacher is the one the checkpoint was made with, and put its weights back
        into the state to load. A checkpoint that holds the teacher's weights (older code, or one saved without
        this hook) must hold this teacher's, equal tensor by tensor: loaded as they were, they would replace a
        teacher whose file was checked (sha256) by weights nobody checked."""
        recorded = checkpoint.get(TEACHER_REFERENCE_KEY)
        now = None if recorded is None else self.teacher_reference()
        if recorded is None:
            self._check_held_teacher(checkpoint["state_dict"])
        elif now["fingerprint"] != recorded["fingerprint"]:
            raise ZSKDError(
                f"this checkpoint was distilled from teacher {recorded['checkpoint'] or '(given in Python)'} "
                f"(fingerprint {recorded['fingerprint'][:12]}), but the teacher given now, "
                f"{now['checkpoint'] or '(given in Python)'}, has fingerprint {now['fingerprint'][:12]}"
            )
        checkpoint["state_dict"].update({_TEACHER_PREFIX + k: v for k, v in self.teacher.state_dict().items()})

    def _check_held_teacher(self, state: dict) -> None:
        """Raise one line if ``state`` holds teacher weights other than this module's teacher's."""
        held = {k[len(_TEACHER_PREFIX):]: v for k, v in state.items() if k.startswith(_TEACHER_PREFIX)}
        if not held:
            return
        ours = self.teacher.state_dict()
        differing = sorted(set(held) ^ set(ours)) or [
            k for k in ours if held[k].shape != ours[k].shape or held[k].dtype != ours[k].dtype
            or not torch.equal(subnormals_flushed(held[k]).to(ours[k].device), ours[k])]  # older files: raw
        if differing:
            raise ZSKDError(
                f"this checkpoint holds teacher weights that differ from the teacher given now "
                f"({self.teacher.checkpoint or '(given in Python)'}; first at {_TEACHER_PREFIX}{differing[0]}): "
                "resume with the teacher it was distilled from")

    # ------------------------------------------------------------------------------------------ export
    def export_student(self, path: str | os.PathLike) -> str:
        """Write the student's weights (safetensors) and its JSON record beside them; returns the weights' path.
        See :mod:`zskd_lightning.export`."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        spec = getattr(datamodule, "input_spec", None)
        shape = spec.shape if spec is not None else getattr(datamodule, "input_shape", None)
        mean = spec.mean if spec is not None else getattr(datamodule, "mean", None)
        std = spec.std if spec is not None else getattr(datamodule, "std", None)
        student_spec = self.hparams.get("student")
        weights, _ = write_student(
            self.student, path, spec=student_spec if isinstance(student_spec, dict) else None,
            input_shape=shape, input_mean=mean, input_std=std,
            num_classes=self.teacher.count_classes(shape) if shape is not None else None,
            teacher=self.teacher_reference(),
        )
        return weights

    def on_train_end(self) -> None:
        if not self.hparams.export_filename:
            return
        folder = self.trainer.log_dir or self.trainer.default_root_dir  # a collective under DDP: every rank asks
        failure = None
        if self.trainer.is_global_zero:
            try:
                self._exported = self.export_student(os.path.join(folder, self.hparams.export_filename))
            except Exception as err:  # a full disk, a read-only folder: every rank learns of it below
                failure = err
        # Decided together: rank 0 failing alone would leave the others in the next collective (a test after
        # fit) until the process group's timeout.
        raise_together(self.trainer.strategy, failure,
                       lambda: f"the student's export failed on global rank 0 at the end of fit (step "
                               f"{self.global_step}): that rank's error says why")
        if self.trainer.is_global_zero:
            rank_zero_info(f"Student exported to {self._exported} (+ {os.path.basename(record_path(self._exported))})")

    def on_test_end(self) -> None:
        """The test accuracy goes into the exported student's record when the weights tested are the ones
        exported (not a checkpoint the test loaded, ``trainer.test(ckpt_path=...)``)."""
        accuracy = self.trainer.callback_metrics.get("test/acc")
        tested_in_memory = self.trainer.ckpt_path is None
        failure = None
        if self._exported and accuracy is not None and tested_in_memory and self.trainer.is_global_zero:
            try:
                update_record(self._exported, test_accuracy=round(100 * float(accuracy), 4))
            except Exception as err:  # the record gone, a full disk: every rank learns of it below
                failure = err
        # decided together, as in on_train_end: the other ranks would otherwise wait in the next collective
        raise_together(self.trainer.strategy, failure,
                       lambda: "writing the test accuracy into the exported student's record failed on global rank 0: "
                               "that rank's error says why")


def _is_hard_label(y: Tensor) -> bool:
    return isinstance(y, Tensor) and y.ndim == 1 and not y.is_floating_point()


def _is_soft_target(y: Tensor) -> bool:
    return isinstance(y, Tensor) and y.ndim == 2 and y.is_floating_point()


def _probability_problem(y: Tensor) -> str | None:
    """Why ``y [B, K]`` is not a batch of distributions (each row >= 0, summing to 1 within 1e-3, or within the
    machine epsilon of ``y``'s float type where that is more: rounding each value moves a row's sum by at most
    half of it, and a ``bf16-true`` Trainer casts the batch's targets to bfloat16), in one line; ``None`` if it
    is."""
    sums = y.detach().float().sum(dim=-1)
    lowest, low_sum, high_sum = float(y.min()), float(sums.min()), float(sums.max())
    tolerance = max(1e-3, torch.finfo(y.dtype).eps)
    if lowest < 0 or abs(low_sum - 1) > tolerance or abs(high_sum - 1) > tolerance:
        return (f"target_source='batch' needs soft targets that are probabilities; this batch's targets reach "
                f"{lowest:.3g} and its rows sum to {low_sum:.4g}..{high_sum:.4g} (a cache of logits, as Lopes' "
                "caches hold, needs target_source='teacher')")
    return None
