"""OnlineDataModule: a replay buffer that a generator fills during distillation, served to the student."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from zskd_lightning.batch_progress import redone_batch
from zskd_lightning.data.evaluation import own_generator
from zskd_lightning.data.synthetic import SyntheticDataModule
from zskd_lightning.errors import InvalidArgument, ZSKDError
from zskd_lightning.online.buffer import ReplayBuffer
from zskd_lightning.online.driver import OnlineSynthesis
from zskd_lightning.online.sampler import UniformSampler
from zskd_lightning.randomness import stream_seed
from zskd_lightning.ranks import every_rank, world_size
from zskd_lightning.synthesis.generator import GeneratorSynthesizer


class BufferBatches(IterableDataset):
    """``steps`` training batches drawn from the live buffer by the sampler, each a dict: ``"inputs"
    [B, C, H, W]``, ``"slots" [B]`` int64 (the buffer entries, for the sampler's loss feedback), ``"stamps" [B]``
    int64 (their write stamps when drawn: the feedback skips entries rewritten since) and, when the sampler gives
    importance weights, ``"weights" [B]`` float32.

    Draws are made when a batch is asked for, so they see the rounds written since. Each process draws from its
    own stream, ``(seed, epoch, rank)``. Resumable: :meth:`state_dict` holds the epoch's stream and the number of
    batches drawn, of every rank (Lightning stores rank 0's loader state only, so under DDP it gathers them), and
    each rank takes its own back on resume; resumed on another number of processes, each rank starts its stream
    for the epoch afresh. A state saved inside a step (``OnExceptionCheckpoint``) also holds that step's batch:
    it was drawn before the step's round wrote to the buffer, so the resumed fit, which redoes the step, is given
    it again rather than a draw from the changed buffer.
    """

    def __init__(self, datamodule: OnlineDataModule) -> None:
        self.datamodule = datamodule
        self._generator: torch.Generator | None = None
        self._epoch, self._drawn = -1, 0
        self._last_batch: dict[str, torch.Tensor] | None = None  # the latest batch drawn (batch ``_drawn - 1``)
        self._restored: dict | None = None

    def __len__(self) -> int:
        return self.datamodule.steps_per_epoch

    def state_dict(self) -> dict:
        """``{"epoch", "drawn", "generator"}`` of this rank, ``"unfinished"``: the batch drawn and not yet
        trained on (saved inside its step or its transfer hooks; the resumed fit redoes it), and under DDP
        ``"ranks"``: every rank's, in rank order (a collective: Lightning saves checkpoints on every rank). Resumed
        and not iterated yet: the state it was given."""
        if self._restored is not None:  # every rank alike (all loaded one checkpoint): no collective on any
            return self._restored
        state = None if self._generator is None else self._generator.get_state()
        own = {"epoch": self._epoch, "drawn": self._drawn, "generator": state}
        if self._last_batch is not None and redone_batch(self.datamodule.trainer) == (self._epoch, self._drawn - 1):
            own["unfinished"] = self._last_batch
        ranks = every_rank(own)
        return own if len(ranks) == 1 else {**own, "ranks": ranks}

    def load_state_dict(self, state: dict) -> None:
        self._restored = state

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        dm = self.datamodule
        trainer = dm.trainer
        epoch, rank = (trainer.current_epoch, trainer.global_rank) if trainer is not None else (0, 0)
        restored, self._restored = self._restored, None
        self._generator, self._epoch, self._drawn, self._last_batch = torch.Generator(), epoch, 0, None
        if restored is not None and restored["epoch"] == epoch:
            # the same on every rank: each drew one batch a step; a batch to redo is served, not counted, again
            self._drawn = restored["drawn"] - ("unfinished" in restored)
            ranks = restored.get("ranks")
            if ranks is not None:
                restored = ranks[rank] if len(ranks) == world_size() else None
            elif world_size() > 1:
                restored = None  # a one-process checkpoint: its stream is rank 0's
        if restored is not None and restored["epoch"] == epoch and restored["generator"] is not None:
            self._generator.set_state(restored["generator"])
            if "unfinished" in restored:
                self._drawn += 1
                self._last_batch = restored["unfinished"]
                yield restored["unfinished"]
        else:
            self._generator.manual_seed(stream_seed(dm.seed, 0xD4A, epoch, rank))
        while self._drawn < dm.steps_per_epoch:
            if len(dm.buffer) == 0:
                raise ZSKDError("the replay buffer is empty: an online run needs the OnlineSynthesis callback "
                                "(DistillationModule adds it) and warmup_rounds >= 1")
            slots, weights = dm.sampler.draw(len(dm.buffer), dm.batch_size, self._generator)
            self._drawn += 1
            batch = {"inputs": dm.buffer.inputs[slots], "slots": slots, "stamps": dm.buffer.stamps[slots]}
            if weights is not None:
                batch["weights"] = weights
            self._last_batch = dict(batch)
            yield batch


class ResumableLoader(DataLoader):
    """A DataLoader whose dataset's ``state_dict`` goes into Lightning checkpoints (Lightning asks the loader)."""

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)


class OnlineDataModule(SyntheticDataModule):
    """Training data made DURING distillation: a generator writes rounds into a fixed-size replay buffer and the
    student trains on batches drawn from it; real data only for evaluation.

    The :class:`~zskd_lightning.online.OnlineSynthesis` callback (which this datamodule asks for, like
    :class:`~zskd_lightning.ImpressionDataModule`) runs ``warmup_rounds`` rounds before the first step, then one
    round every ``round_every_n_steps`` training steps; every round makes ``(1 + draws_per_round) *
    synthesizer.batch_size`` inputs per process and writes them over the buffer's oldest entries (``"ring"``) or
    over its lowest-scored ones, class by class (``"balanced"``). Under DDP every process makes its share of a
    round from ``(seed, round, rank)``, the shares are all-gathered in rank order, and every process holds the
    same buffer and the same generator (its gradients are averaged): a run is reproducible for a fixed seed and
    world size.

    Args:
        synthesizer: the generator method (e.g. :class:`~zskd_lightning.synthesis.FastSynthesizer`).
        buffer_size: the replay buffer's capacity (inputs).
        steps_per_epoch: training batches per epoch (FastDFKD: 400).
        batch_size: inputs per training batch per process.
        warmup_rounds: rounds before the student's first step.
        round_every_n_steps: optimizer steps (``trainer.global_step``) between rounds: under gradient
            accumulation of ``A`` batches, a round every ``A * round_every_n_steps`` training batches.
        draws_per_round: batches of ``synthesizer.batch_size`` the round's generator adds after its training
            steps, each from fresh noise by one forward pass without a gradient step
            (:meth:`~zskd_lightning.synthesis.GeneratorSynthesizer.draw`): ``(1 + draws_per_round) *
            batch_size`` new inputs a round for little more than its steps' cost. 0: the round's batch only.
            (MNIST SSD-KD, validation split: no gain; README, "MNIST".)
        sampler: which buffer entries a batch draws (default :class:`~zskd_lightning.online.UniformSampler`;
            SSD-KD: :class:`~zskd_lightning.online.PrioritySampler`).
        buffer_update: ``"ring"``: every round overwrites the oldest entries; ``"balanced"``: SSD-KD's partial
            update (:meth:`~zskd_lightning.online.ReplayBuffer.write_balanced`), new inputs ranked by the method's
            per-sample weights, held scores multiplied by ``score_decay`` each round. SSD-KD's weights are
            normalized per batch (mean 1), so a score says how hard an input was next to its own batch, not in
            absolute terms: a round of easy inputs competes for slots as well as a round of hard ones.
        seed: seeds the generator's start, every round and every draw.
        input_shape, input_mean, input_std, eval_data, predict_data, validate_on_real, batch_augmentation: see
            :class:`~zskd_lightning.data.SyntheticDataModule`.
    """

    def __init__(
        self,
        synthesizer: GeneratorSynthesizer,
        buffer_size: int,
        steps_per_epoch: int = 400,
        batch_size: int = 256,
        warmup_rounds: int = 10,
        round_every_n_steps: int = 1,
        draws_per_round: int = 0,
        sampler: UniformSampler | None = None,
        buffer_update: Literal["ring", "balanced"] = "ring",
        score_decay: float = 0.9,
        seed: int = 0,
        input_shape: Sequence[int] | None = None,
        input_mean: Sequence[float] | None = None,
        input_std: Sequence[float] | None = None,
        eval_data: L.LightningDataModule | None = None,
        predict_data: L.LightningDataModule | None = None,
        validate_on_real: bool = False,
        batch_augmentation: nn.Module | None = None,
    ) -> None:
        super().__init__(input_shape, input_mean, input_std, eval_data, predict_data, validate_on_real,
                         batch_augmentation)
        for name, value, least in (("buffer_size", buffer_size, 1), ("steps_per_epoch", steps_per_epoch, 1),
                                   ("batch_size", batch_size, 1), ("warmup_rounds", warmup_rounds, 1),
                                   ("round_every_n_steps", round_every_n_steps, 1),
                                   ("draws_per_round", draws_per_round, 0), ("seed", seed, 0)):
            if value < least:
                raise InvalidArgument(f"{name} must be >= {least}, got {value}")
        self.synthesizer = synthesizer
        self.buffer = ReplayBuffer(buffer_size, self.input_spec.shape)
        self.sampler = sampler if sampler is not None else UniformSampler()
        if buffer_update not in ("ring", "balanced"):
            raise InvalidArgument(f"buffer_update must be 'ring' or 'balanced', got {buffer_update!r}")
        if not 0 < score_decay <= 1:
            raise InvalidArgument(f"score_decay must be in (0, 1], got {score_decay}")
        self.buffer_update, self.score_decay = buffer_update, float(score_decay)
        self.sampler.setup(buffer_size)
        self.steps_per_epoch, self.batch_size = steps_per_epoch, batch_size
        self.warmup_rounds, self.round_every_n_steps, self.seed = warmup_rounds, round_every_n_steps, seed
        self.draws_per_round = draws_per_round

    def synthesis_callbacks(self) -> list[Callback]:
        """The callback that fills the buffer during fit."""
        return [OnlineSynthesis()]

    def train_dataloader(self) -> DataLoader:
        # Batches come ready-made from the live buffer, in this process (no workers: they would hold copies).
        warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
        # Its own generator: a new iterator draws its (unused) worker base seed from it, not from the global
        # stream, which a resumed fit puts back at its first batch (DistillationModule).
        return ResumableLoader(BufferBatches(self), batch_size=None, generator=own_generator())
