"""OnlineSynthesis: the callback that runs generator rounds during distillation and keeps the replay buffer.

Rank semantics: every process runs every round (its share, from ``(seed, round, rank)``), the generator's
gradients are averaged and the shares all-gathered, so all processes hold the same generator, buffer and
sampler state; checkpoints (written from rank 0) carry them through this callback's ``state_dict``.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from zskd_lightning.checks import check_trainer_precision
from zskd_lightning.errors import REPLAY_NEEDS_TEACHER_TARGETS, ZSKDError
from zskd_lightning.interrupts import interrupts_held
from zskd_lightning.pictures import labelled_grid, publish_picture
from zskd_lightning.synthesis.api import Chunk, SynthesisContext


class OnlineSynthesis(Callback):
    """Fill the :class:`~zskd_lightning.online.OnlineDataModule`'s replay buffer during ``fit``.

    ``warmup_rounds`` rounds at the start of training (not again on resume), then one round before every
    ``round_every_n_steps``-th training step. Before each round, weightings with an ``observe`` method (SSD-KD's
    modulating function, in the synthesizer and in the LightningModule) get the buffer's counts of the teacher's
    predicted classes; after it, the round is written by the datamodule's ``buffer_update`` rule. Feeds the sampler
    the per-sample distillation losses when it asks for them (after the step's backward, from the module's
    ``last_replay_losses``; else from the step's output at ``on_train_batch_end``). Shows ``round``, ``buffer``
    (filled fraction) and ``gen_loss`` (the mean per-input objective of the round's inputs, its trained batch
    and its draws: the method's matching term, not the adversarial or prior terms nor phi) on the progress bar and logs them (``online/...``) with the synthesis wall
    time; at the end of training rank 0 writes a picture of the buffer, one row per class (``grid_filename`` in
    the run's log folder; ``None``: off). A new fit (no checkpoint) starts from an empty buffer, a new sampler
    state and no rounds, whatever an earlier fit left.

    State in checkpoints: the round count, the generator, its optimizer (and Reptile's meta weights), the
    buffer and the sampler; saved inside a round (``OnExceptionCheckpoint``), the generator and its optimizer as
    the round found them (the resumed fit redoes that round). The buffer write, the sampler's news of it and the
    round count change together: a Ctrl-C among them is held until all are done.
    """

    def __init__(self, grid_filename: str | None = "buffer.png") -> None:
        self.grid_filename = grid_filename
        self._start_counts()
        self._datamodule: Any = None
        self._module: Any = None
        self._context: SynthesisContext | None = None
        self._pending: dict[str, Any] | None = None
        self._round_start: dict[str, Any] | None = None  # the synthesizer's state while a round is under way
        self._feedback_batch: Any = None  # this step's replay batch while its losses have not reached the sampler

    def _start_counts(self) -> None:
        """The rounds, their counts and the classes last observed, as before any round of a fit."""
        self.rounds = self.synthesized = 0
        self.synthesis_seconds, self.generator_loss = 0.0, math.nan
        self._last_round_step = self._logged_rounds = -1
        self._observed_counts: Tensor | None = None

    # ------------------------------------------------------------------------------------------- setup
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # Before Lightning restores a checkpoint's state (load_state_dict): a state an earlier fit loaded and never
        # applied (it stopped before training) is not this fit's, which resumes only what it loads itself.
        self._pending = None
        datamodule = trainer.datamodule
        if not all(hasattr(datamodule, name) for name in ("buffer", "synthesizer", "sampler")):
            raise ZSKDError(f"OnlineSynthesis fills an OnlineDataModule's replay buffer; the Trainer's datamodule is "
                            f"{type(datamodule).__name__}")
        if datamodule.buffer_update == "balanced" and datamodule.synthesizer.sample_weights is None:
            raise ZSKDError("buffer_update='balanced' ranks new inputs by the method's per-sample weights; this "
                            "synthesizer has no sample_weights (e.g. SSDKDSynthesizer's modulating function)")
        check_trainer_precision(trainer.precision)
        for name in ("teacher", "student"):
            if not hasattr(pl_module, name):
                raise ZSKDError(f"OnlineSynthesis needs a LightningModule with a `{name}` (a DistillationModule); "
                                f"got {type(pl_module).__name__}")
        if getattr(getattr(pl_module, "hparams", None), "target_source", "teacher") != "teacher":
            raise ZSKDError(REPLAY_NEEDS_TEACHER_TARGETS)
        self._datamodule = datamodule
        self._module = pl_module

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = self._datamodule
        self._round_start = None  # a round an earlier fit of this callback left unfinished is over
        self._context = SynthesisContext(
            teacher=pl_module.teacher, input_spec=dm.input_spec,
            num_classes=pl_module.teacher.count_classes(dm.input_spec.shape), device=pl_module.device,
            autocast=trainer.precision_plugin.forward_context, student=pl_module.student, seed=dm.seed,
        )
        dm.synthesizer.setup(self._context)
        if self._pending is not None:
            self._restore(self._pending)
            self._pending = None
            rank_zero_info(f"Online synthesis resumed at round {self.rounds}, buffer {len(dm.buffer)}/"
                           f"{dm.buffer.capacity}")
        else:  # a new fit (its generator is new): an earlier fit's buffer, sampler and counts are forgotten
            dm.buffer.clear()
            dm.sampler.setup(dm.buffer.capacity)
            self._start_counts()
        dm.sampler.plan(_fit_batches(trainer))
        if self.rounds < dm.warmup_rounds:
            rank_zero_info(f"Online synthesis: {dm.warmup_rounds - self.rounds} warm-up rounds of "
                           f"{dm.synthesizer.batch_size * (1 + dm.draws_per_round) * trainer.world_size} inputs")
        while self.rounds < dm.warmup_rounds:
            self._round(trainer)

    # ------------------------------------------------------------------------------------------ rounds
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._feedback_batch = batch if self._datamodule.sampler.wants_losses else None  # until its losses are in
        if getattr(pl_module, "last_replay_losses", None) is not None:
            pl_module.last_replay_losses = None  # an earlier step's
        step = trainer.global_step
        if step > 0 and step % self._datamodule.round_every_n_steps == 0 and step != self._last_round_step:
            self._round(trainer, step)

    def _round(self, trainer: L.Trainer, step: int | None = None) -> None:
        """One round (:meth:`on_train_start`'s warm-up rounds: ``step`` None; else the training step it comes
        before, which does not run it again once resumed)."""
        dm, strategy = self._datamodule, trainer.strategy
        world, rank, size = trainer.world_size, trainer.global_rank, dm.synthesizer.batch_size
        batches = 1 + dm.draws_per_round
        started = time.perf_counter()
        # a checkpoint saved inside the round (OnExceptionCheckpoint) holds the generator as the round found it:
        # the resumed fit redoes the whole round (its count has not moved), as the unstopped run made it
        self._round_start = copy.deepcopy(dm.synthesizer.state_dict())
        self._observe(dm.buffer.predicted_counts(self._context.num_classes))
        if world > 1 and dm.synthesizer.reads_student:
            _from_rank_zero(self._context.student)
        average = None if world == 1 else (lambda tensors: _average(strategy, tensors))

        def chunk(batch: int) -> Chunk:  # batch 0 trains the generator, the others are draws from it
            index = (self.rounds * batches + batch) * world + rank
            return Chunk.of(dm.seed, index, index * size, (index + 1) * size)

        results = [dm.synthesizer.round(self._context, chunk(0), average)]
        results += [dm.synthesizer.draw(self._context, chunk(b)) for b in range(1, batches)]
        inputs, labels, loss = (torch.cat([getattr(r, name) for r in results]) for name in ("inputs", "labels", "loss"))
        # a synthesizer that returns no teacher predictions has its labels stand for them
        predicted = torch.cat([r.labels if r.predicted is None else r.predicted for r in results])
        scores = None if results[0].weights is None else torch.cat([r.weights for r in results])
        if world > 1:
            inputs, labels, loss, predicted = (_gathered(strategy, t) for t in (inputs, labels, loss, predicted))
            scores = None if scores is None else _gathered(strategy, scores)
        # Written whole or not at all: a Ctrl-C here would leave a checkpoint (OnExceptionCheckpoint) with part of
        # the round in the buffer and the round count unmoved, which the resumed fit would write over again.
        with interrupts_held():
            if dm.buffer_update == "balanced":
                slots = dm.buffer.write_balanced(inputs, labels, scores, self._context.num_classes, dm.score_decay,
                                                 predicted=predicted)
            else:
                slots = dm.buffer.add(inputs, labels, predicted)
            dm.sampler.written(slots)
            self.rounds += 1
            if step is not None:  # a warm-up round belongs to no step
                self._last_round_step = step
            self._round_start = None
            self.synthesized += len(inputs)
            self.generator_loss = float(loss.mean())
            self.synthesis_seconds += time.perf_counter() - started

    def _observe(self, counts: Tensor) -> None:
        """Give the buffer's counts of the teacher's predicted classes ``[K]`` (at a round's start) to the
        weightings that read them (the diversity part of SSD-KD's modulating function, the synthesizer's and the
        module's); kept for checkpoints."""
        self._observed_counts = counts
        for weighting in (self._datamodule.synthesizer.sample_weights, getattr(self._module, "sample_weights", None)):
            if hasattr(weighting, "observe"):
                weighting.observe(counts)

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The step's losses reach the sampler before Lightning counts the batch processed (every batch runs its
        # backward, also under gradient accumulation): a failure after the optimizer's step (a Ctrl-C at another
        # callback's sync in on_train_batch_end) saves a checkpoint whose resumed fit does not redo the batch, so
        # its priorities must be in it; a failure before it redoes the batch, whose same losses set the same
        # priorities again. A module that keeps no `last_replay_losses` (DistillationModule does) gives them at
        # on_train_batch_end instead.
        losses = getattr(pl_module, "last_replay_losses", None)
        if self._feedback_batch is not None and losses is not None:
            self._feed_sampler(trainer, self._feedback_batch, losses)

    def _feed_sampler(self, trainer: L.Trainer, batch: dict[str, Tensor], per_sample_loss: Tensor) -> None:
        """Give the sampler the per-sample losses ``[B]`` of this step's replay ``batch``, from every process."""
        dm = self._datamodule
        self._feedback_batch = None
        slots, losses = batch["slots"].detach().cpu(), per_sample_loss.detach().float().cpu()
        # a batch without stamps was saved inside a step by older code: its entries count as unchanged
        stamps = batch["stamps"].cpu() if "stamps" in batch else dm.buffer.stamps[slots]
        if trainer.world_size > 1:
            slots, losses, stamps = (_gathered(trainer.strategy, t) for t in (slots, losses, stamps))
        # The batch was drawn before this step's round (Lightning fetches a sized loader's batch at the step,
        # not ahead): an entry the round rewrote since holds a new input, which keeps its first priority until
        # drawn itself.
        kept = dm.buffer.stamps[slots] == stamps
        with interrupts_held():  # all the batch's priorities or none
            dm.sampler.update(slots[kept], losses[kept])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        dm = self._datamodule
        if self._feedback_batch is not None:  # not given after the backward
            if not (isinstance(outputs, dict) and "per_sample_loss" in outputs and isinstance(batch, dict)):
                raise ZSKDError("this sampler learns from per-sample losses: the training step must return "
                                "{'loss', 'per_sample_loss'} for replay batches (DistillationModule does)")
            self._feed_sampler(trainer, batch, outputs["per_sample_loss"])
        every = trainer.log_every_n_steps  # 0: Lightning logs no steps
        logging_step = bool(every) and trainer.global_step % every == 0  # the step Lightning's loggers write
        if self.rounds == self._logged_rounds and batch_idx and not logging_step:
            return  # nothing new since the last log; each log call costs about a millisecond
        self._logged_rounds = self.rounds
        metrics = {"online/round": float(self.rounds), "online/buffer": len(dm.buffer) / dm.buffer.capacity,
                   "online/gen_loss": self.generator_loss}
        pl_module.log_dict({k.replace("online/", ""): v for k, v in metrics.items()}, prog_bar=True, logger=False)
        pl_module.log_dict({**metrics, "online/synthesized": float(self.synthesized),
                            "online/synthesis_s": self.synthesis_seconds}, prog_bar=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = self._datamodule
        rank_zero_info(f"Online synthesis: {self.rounds} rounds, {self.synthesized} inputs synthesized in "
                       f"{self.synthesis_seconds:.1f} s; buffer {len(dm.buffer)}/{dm.buffer.capacity}")
        folder = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank asks
        if trainer.is_global_zero and self.grid_filename and len(dm.buffer):
            held = len(dm.buffer)
            path = publish_picture(
                lambda: labelled_grid(dm.buffer.inputs[:held], dm.buffer.labels[:held], dm.input_spec.valid_range()),
                os.path.join(folder, self.grid_filename), trainer.loggers, "replay_buffer", step=trainer.global_step)
            if path is not None:
                rank_zero_info(f"Replay buffer picture written to {path}")

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        dm = self._datamodule
        if self._pending is not None or dm is None or dm.synthesizer.generator is None:
            return dict(self._pending or {})  # a loaded state not applied yet is still the run's
        return {"rounds": self.rounds, "synthesized": self.synthesized, "synthesis_seconds": self.synthesis_seconds,
                "last_round_step": self._last_round_step, "generator_loss": self.generator_loss,
                "synthesizer": self._round_start or dm.synthesizer.state_dict(), "buffer": dm.buffer.state_dict(),
                "sampler": dm.sampler.state_dict(), "observed_counts": self._observed_counts}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Kept until training starts (the generator is built then), and restored there."""
        self._pending = dict(state_dict) if state_dict else None

    def _restore(self, state: dict[str, Any]) -> None:
        dm = self._datamodule
        dm.sampler.load_state_dict(state["sampler"])  # first: a sampler of another kind refuses the state
        dm.synthesizer.load_state_dict(state["synthesizer"])
        dm.buffer.load_state_dict(state["buffer"])
        self.rounds, self.synthesized = int(state["rounds"]), int(state["synthesized"])
        self.synthesis_seconds, self._last_round_step = float(state["synthesis_seconds"]), int(state["last_round_step"])
        self.generator_loss = float(state["generator_loss"])
        if state.get("observed_counts") is not None:  # the weights between the last round and the next as before
            self._observe(state["observed_counts"])


def _from_rank_zero(module: torch.nn.Module) -> None:
    """Give every process rank 0's buffers of ``module`` (in place; a collective). After a training step each rank
    holds BatchNorm running statistics moved by its own batch (DDP hands out rank 0's only at the next forward),
    while a checkpoint keeps rank 0's: a round that reads the student in eval mode would see, on the other ranks,
    a student the resumed fit never restores."""
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for buffer in module.buffers():
        groups.setdefault((buffer.dtype, buffer.device), []).append(buffer)
    for buffers in groups.values():  # one collective per dtype and device
        _through_one_collective(buffers, lambda flat: torch.distributed.broadcast(flat, src=0) or flat)


def _fit_batches(trainer: L.Trainer) -> int | None:
    """The training batches each process draws in the whole fit (``None``: a fit without an end): the epochs'
    batches, cut at ``max_steps`` optimizer steps of ``accumulate_grad_batches`` batches each (Lightning also
    steps on each epoch's last batch, so an epoch of ``n`` batches makes ``ceil(n / accumulate)`` steps)."""
    per_epoch, accumulate = trainer.num_training_batches, trainer.accumulate_grad_batches
    epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else math.inf
    batches = per_epoch * epochs if epochs else 0
    steps = trainer.max_steps
    if steps is not None and steps >= 0:
        if math.isfinite(per_epoch) and per_epoch > 0:
            whole_epochs, rest = divmod(steps, math.ceil(per_epoch / accumulate))
            batches = min(batches, whole_epochs * per_epoch + min(rest * accumulate, per_epoch))
        else:  # a loader without a length: one epoch
            batches = min(batches, steps * accumulate)
    return int(batches) if math.isfinite(batches) and batches > 0 else None


def _average(strategy: Any, tensors: list[Tensor]) -> None:
    """Average ``tensors`` across processes in place (one collective over their concatenation)."""
    _through_one_collective(tensors, lambda flat: strategy.reduce(flat, reduce_op="mean"))


def _through_one_collective(tensors: list[Tensor], collective: Callable[[Tensor], Tensor]) -> None:
    """Run ``collective`` on the concatenation of ``tensors`` (one dtype and device) and copy its result back into
    them, in place."""
    if not tensors:
        return
    flat = collective(torch.cat([t.reshape(-1) for t in tensors]))
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset: offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()


def _gathered(strategy: Any, tensor: Tensor) -> Tensor:
    """Every process's ``tensor [N, ...]`` concatenated in rank order ``[world * N, ...]`` (on the CPU)."""
    device = strategy.root_device
    return strategy.all_gather(tensor.to(device)).reshape(-1, *tensor.shape[1:]).cpu()
