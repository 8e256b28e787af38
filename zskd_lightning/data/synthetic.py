"""The base of datamodules whose training data a teacher synthesizes: the teacher's input space, and real data
for evaluation only (testing, prediction, opt-in validation)."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader

from zskd_lightning.augment import augment_normalized
from zskd_lightning.batch_progress import fetched_batch, redone_batch
from zskd_lightning.data.evaluation import ValidationSwitch
from zskd_lightning.errors import InvalidArgument, ZSKDError
from zskd_lightning.pixels import InputRange, InputSpec
from zskd_lightning.randomness import TrainingStreams, seeded_streams


def _check_same_space(eval_data: L.LightningDataModule | None, **given: Sequence[float] | None) -> None:
    """Refuse an ``input_shape`` / ``input_mean`` / ``input_std`` that differs from ``eval_data``'s own (which
    serves the test images so): the student would learn in one input space and be tested in another."""
    for name, value in given.items():
        served = getattr(eval_data, "input_shape" if name == "shape" else name, None)
        if value is None or served is None:
            continue
        kind = int if name == "shape" else float
        value, served = [kind(v) for v in value], [kind(v) for v in served]
        if len(value) != len(served) or any(abs(a - b) > 5e-4 for a, b in zip(value, served)):  # 4 decimals agree
            raise InvalidArgument(f"input_{name} {value} differs from eval_data's ({type(eval_data).__name__}) "
                                  f"{served}, which it tests the student on: give eval_data the teacher's "
                                  f"input space, or leave input_{name} out")


class SyntheticDataModule(ValidationSwitch, L.LightningDataModule):
    """Holds the teacher's :class:`~zskd_lightning.pixels.InputSpec` and the real data that evaluates a student.

    Args:
        input_shape: ``(C, H, W)`` of the teacher's inputs; default: ``eval_data.input_shape``.
        input_mean / input_std: per-channel normalization of the teacher's inputs (synthetic inputs are kept in
            the valid range, :func:`zskd_lightning.pixels.valid_range`), both or neither. Default: ``eval_data``'s;
            given with an ``eval_data`` that has its own (and ``input_shape`` alike), they must equal it to about
            4 decimals, since ``eval_data`` serves the test images in that space.
        eval_data: a labelled DataModule whose TEST split evaluates the student.
        predict_data: a DataModule whose ``predict_dataloader`` gives the inputs ``zskd predict`` labels (default:
            ``eval_data``'s).
        validate_on_real: also validate on ``eval_data``'s validation split (``val/acc``, and
            ``val/real_agreement`` beside held-out impressions; alone, it gives ``val/agreement`` and ``val/loss``),
            for monitoring. Off by default: for the MNIST/CIFAR modules that split is a part of the official
            TRAINING set, which a data-free run otherwise never reads. Never use it to choose a model or an epoch
            unless that is what you mean to do.
        batch_augmentation: a module applied to whole pixel-space training batches on their device, e.g.
            :class:`~zskd_lightning.augment.BatchAugmentation` (per-sample random, vectorised); the teacher
            labels the augmented batch, as the student sees it. Each training batch's augmentation draws from its
            own stream, keyed by ``(run seed, training batches augmented so far, rank)`` (the run seed: torch's
            initial seed at ``setup``, ``seed_everything``'s), and the count is in checkpoints: a resumed run
            augments as an unstopped one would, and the global stream (the student's dropout) is left alone.
    """

    def __init__(self, input_shape: Sequence[int] | None = None, input_mean: Sequence[float] | None = None,
                 input_std: Sequence[float] | None = None, eval_data: L.LightningDataModule | None = None,
                 predict_data: L.LightningDataModule | None = None, validate_on_real: bool = False,
                 batch_augmentation: nn.Module | None = None) -> None:
        super().__init__()
        self.eval_data = eval_data
        self.predict_data = predict_data
        if validate_on_real and eval_data is None:
            raise InvalidArgument("validate_on_real needs an eval_data with a validation split")
        self.validate_on_real = validate_on_real
        self.batch_augmentation = batch_augmentation
        self.training_streams = TrainingStreams()  # keys of the training batches' random draws; in checkpoints
        shape = tuple(input_shape) if input_shape else tuple(getattr(eval_data, "input_shape", ()) or ())
        if not shape:
            raise ZSKDError(f"{type(self).__name__} needs input_shape (C, H, W) or an eval_data that defines it")
        if (input_mean is None) != (input_std is None):
            given, missing = ("input_mean", "input_std") if input_std is None else ("input_std", "input_mean")
            raise InvalidArgument(f"{given} is given without {missing}: give both (the teacher's normalization) "
                                  "or neither (eval_data's)")
        _check_same_space(eval_data, shape=input_shape, mean=input_mean, std=input_std)
        mean = input_mean if input_mean is not None else getattr(eval_data, "mean", None)
        std = input_std if input_std is not None else getattr(eval_data, "std", None)
        has_normalization = mean is not None and std is not None
        #: The teacher's input space: its one owner in a run (synthesis, pictures, augmentation).
        self.input_spec = InputSpec(shape, mean if has_normalization else None, std if has_normalization else None)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.input_spec.shape

    def input_range(self) -> InputRange | None:
        """Per-channel valid ``(min, max)`` of the teacher's inputs, each ``[C, 1, 1]``; ``None`` if unknown."""
        return self.input_spec.valid_range()

    def _has_validation(self) -> bool:
        return self.validate_on_real

    def prepare_data(self) -> None:
        """Download what ``eval_data`` and ``predict_data`` need, once per node (Lightning calls this on one
        process per node before ``setup``; the ranks never download side by side)."""
        for source in (self.eval_data, self.predict_data):
            if source is not None:
                source.prepare_data()

    def setup(self, stage: str) -> None:
        # Evaluation data is opened at the start of fit too: missing files end the run before any synthesis.
        for source in (self.eval_data, self.predict_data):  # their loaders take this Trainer's share of the data
            if isinstance(source, L.LightningDataModule):
                source.trainer = self.trainer
        if stage in ("fit", "test") or (stage == "predict" and self.predict_data is None):
            if self.eval_data is not None:
                self.eval_data.setup("test")
        if stage == "predict" and self.predict_data is not None:
            self.predict_data.setup("predict")
        if stage in ("fit", "validate") and self.validate_on_real:
            self.eval_data.setup("validate")
            held_out = getattr(self.eval_data, "val_dataset", None)
            if held_out is not None and len(held_out) == 0:
                raise InvalidArgument(f"validate_on_real needs real validation images; {type(self.eval_data).__name__}"
                                      f"'s validation split is empty (val_fraction "
                                      f"{getattr(self.eval_data, 'val_fraction', '?')}): give it a val_fraction > 0 or "
                                      "set validate_on_real: false")
        if stage == "fit" and not self._has_validation():
            self._no_validation_this_fit()
        if stage == "fit":  # a new fit's streams (a resumed fit's come from its checkpoint, restored after setup)
            self.training_streams.start()
        if self.input_spec.mean is None and stage == "fit":
            rank_zero_warn(f"{type(self).__name__} has no input_mean/input_std: synthetic inputs are not "
                           "range-limited")

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Apply ``batch_augmentation`` to training batches on their device: ``(inputs, targets)`` tuples, or
        the ``"inputs"`` of dict batches (replay batches)."""
        if self.batch_augmentation is None or self.trainer is None or not self.trainer.training:
            return batch
        inputs = batch["inputs"] if isinstance(batch, dict) else batch[0]
        seed = self.training_streams.next_batch_seed(self.trainer.global_rank, fetched_batch(self.trainer))
        with seeded_streams(seed, inputs.device):
            inputs = augment_normalized(inputs, self.batch_augmentation, self.input_range())
        return {**batch, "inputs": inputs} if isinstance(batch, dict) else (inputs, batch[1])

    def state_dict(self) -> dict:
        """Where the training batches' random streams are (:class:`~zskd_lightning.randomness.TrainingStreams`;
        the same on every rank)."""
        return self.training_streams.state_dict(redone_batch(self.trainer))

    def load_state_dict(self, state_dict: dict) -> None:
        self.training_streams.load_state_dict(state_dict)

    def real_val_loaders(self) -> list[DataLoader]:
        """``[eval_data's validation split]`` with ``validate_on_real``, else ``[]``."""
        return [self.eval_data.val_dataloader()] if self.validate_on_real else []

    def val_dataloader(self) -> list[DataLoader]:
        return self.real_val_loaders()

    def test_dataloader(self) -> DataLoader:
        if self.eval_data is None:
            raise ZSKDError("testing needs eval_data (a labelled DataModule whose test split evaluates the student)")
        return self.eval_data.test_dataloader()

    def predict_dataloader(self) -> DataLoader:
        source = self.predict_data if self.predict_data is not None else self.eval_data
        if source is None:
            raise ZSKDError("predict needs predict_data or eval_data (a DataModule with a predict_dataloader)")
        return source.predict_dataloader()
