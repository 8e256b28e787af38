"""Where a fitting Trainer is among its training batches, as keys of per-batch random draws need it.

Lightning fetches a batch and runs its transfer hooks (``on_after_batch_transfer``) before it counts the batch
*ready*, then runs the step and counts it *processed*. A checkpoint saved in between (``OnExceptionCheckpoint``,
an exception inside the step or inside the transfer hooks) is resumed by redoing that batch, so what the batch
drew must not count as spent.
"""

from __future__ import annotations

#: ``(epoch, index of the batch within the epoch)``
BatchKey = tuple[int, int]


def epoch_progress(trainer):
    """The fit loop's counts (``ready``, ``processed``, ...) of the current epoch's batches, or ``None`` (no
    Trainer, or an object without Lightning's fit loop)."""
    batch_progress = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None), "batch_progress", None)
    return getattr(batch_progress, "current", None)


def fetched_batch(trainer) -> BatchKey | None:
    """Key of the training batch being fetched (from its transfer hooks; Lightning has not counted it yet), or
    ``None`` without a Lightning Trainer."""
    progress = epoch_progress(trainer)
    return None if progress is None else (trainer.current_epoch, progress.ready)


def redone_batch(trainer) -> BatchKey | None:
    """Key of the training batch a fit resumed from a checkpoint saved now starts with: the first one not processed,
    ``(epoch, processed)``. A loader or stream that has already served or drawn for that key (inside its step, or
    in its transfer hooks, before Lightning counts it ready) must not count it as spent: the resumed fit fetches it
    again. ``None`` without a Trainer."""
    progress = epoch_progress(trainer)
    return None if progress is None else (trainer.current_epoch, progress.processed)


def unfinished_batch(trainer) -> BatchKey | None:
    """Key of the training batch whose step has begun and not ended (counted ready, not processed): a checkpoint
    saved now makes the resumed fit redo it. ``None`` between steps, outside ``fit`` or without a Trainer."""
    progress = epoch_progress(trainer)
    if progress is not None and progress.ready > progress.processed:
        return trainer.current_epoch, progress.ready - 1
    return None
