"""A callback that keeps every rank's global random generators in checkpoints and puts them back when a fit
resumes, so that what draws from them during training (dropout, a user's own ``torch.rand``) goes on as it would
have in an unstopped run on the same number of processes."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback

from zskd_lightning.batch_progress import BatchKey, unfinished_batch
from zskd_lightning.randomness import capture_states, gather_states, restore_states

#: Checkpoint key of the states: a list, one :func:`~zskd_lightning.randomness.capture_states` dict per rank.
RANDOM_STATE_KEY = "zskd_random_states"


class ResumedRandomStreams(Callback):
    """Saves every rank's global generators (Python, NumPy, torch's CPU generator and CUDA's) under
    ``"zskd_random_states"`` and restores them at the first training batch of a fit resumed with ``ckpt_path``.

    Rank semantics: saving is a collective (Lightning saves checkpoints on every rank and writes rank 0's file,
    so the states are gathered into it); rank ``r`` restores entry ``r``. A checkpoint from another world size is
    not restored (the run goes on from its own seed). A new fit of a module loaded with ``load_from_checkpoint``
    keeps its own seed's streams. :class:`~zskd_lightning.DistillationModule` and
    :class:`~zskd_lightning.ClassifierModule` add it themselves (``configure_callbacks``).

    A checkpoint saved inside a step (``OnExceptionCheckpoint``; the resumed fit redoes the batch) holds the
    states at that batch's start, not those the failed step left: they are captured at every training batch's
    start (about 50 us on a 2-core CPU, most of it NumPy's ``get_state``), with the batch they belong to. Saved
    before that capture (a Trainer callback's ``on_train_batch_start``, which runs first, failed), it holds the
    states as they are: the previous batch's draws ended there.
    """

    def __init__(self) -> None:
        self._saved: list[dict] | None = None  # from a checkpoint, until the first training batch
        self._batch_start: dict | None = None  # this rank's states at the start of training batch ...
        self._batch_start_key: BatchKey | None = None  # ... this one

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self._saved is not None:  # resumed, no batch yet (saved in on_train_start, say): what was loaded
            checkpoint[RANDOM_STATE_KEY] = self._saved  # (every rank alike: no collective on any)
            return
        redone = unfinished_batch(trainer)
        start = self._batch_start if redone is not None and redone == self._batch_start_key else None
        checkpoint[RANDOM_STATE_KEY] = gather_states(pl_module.device, start)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._saved = checkpoint.get(RANDOM_STATE_KEY)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is None:  # a new fit (e.g. of a module from load_from_checkpoint): its own seed
            self._saved = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        states, self._saved = self._saved, None
        if states is not None and len(states) == trainer.world_size:  # else another world size: go on as is
            restore_states(states[trainer.global_rank], pl_module.device)
        self._batch_start, self._batch_start_key = capture_states(pl_module.device), unfinished_batch(trainer)
