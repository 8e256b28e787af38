"""Training loaders whose order and per-sample draws are keyed by ``(fit seed, epoch, index)``: a fit resumed at
an epoch's end or in its middle reads the batches an unstopped one would (on the same number of processes and
batch size; with or without loader workers). Resumed mid-epoch on another number of processes with the same
samples a step (2 x 64 -> 1 x 128), it reads the samples of the epoch not read yet, each once; on another number
a step, or another dataset length, the rest of that epoch is not exact (a warning says so).

torch's ``shuffle=True`` draws each epoch's order, and the workers' seeds, from the global stream when the
loader's iterator is made; a per-sample transform draws from whichever process runs it. A resumed fit makes its
first iterator before a checkpoint's generators are back, so it reads another order and other draws. Here:

- :class:`EpochKeyedSampler` is a ``DistributedSampler`` (Lightning leaves it in place under DDP: rank ``r`` of
  ``W`` reads every ``W``-th index of the epoch's permutation) shuffling by ``(seed, epoch)``. It yields keys
  ``(epoch, index)``; its epoch is set when the loader is made (a resumed fit's first epoch) and by Lightning at
  every epoch start.
- :class:`EpochKeyedDataset` serves key ``(epoch, index)`` as ``dataset[index]`` computed on torch's CPU
  generator seeded from ``(seed, epoch, index)`` (only where items draw: ``random_items``), so random transforms
  that draw from torch (torchvision's do) give the same item wherever and whenever they run, and the global
  stream does not move. Python's ``random`` and NumPy's draws in a transform are not covered.
- :class:`EpochKeyedLoader` is a ``DataLoader`` whose ``state_dict`` (which Lightning puts in checkpoints) holds
  the epoch and the batches served from it: a fit resumed mid-epoch goes on with the epoch's next batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from zskd_lightning.batch_progress import epoch_progress
from zskd_lightning.randomness import seeded_streams, stream_seed

ORDER, ITEMS, WORKERS = 0x0D3, 0x17E, 0x3C7  # keys setting the three uses of a fit's seed apart


class EpochKeyedSampler(DistributedSampler):
    """Keys ``(epoch, index)`` of one rank's share of an epoch: a permutation of ``range(len(dataset))`` seeded
    by ``(seed, epoch)`` when ``shuffle``, else in order; padded by repetition to a multiple of ``world_size``.

    Args:
        dataset: a sized dataset (only its length is read).
        seed: the fit's seed (an integer >= 0; reduced to 62 bits, so that the epoch added to it stays in range).
        epoch: the epoch the next iterator serves (:meth:`set_epoch` changes it).
        rank / world_size: this process's share.
    """

    def __init__(self, dataset: Dataset, *, seed: int, epoch: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                         seed=stream_seed(seed, ORDER) >> 1, drop_last=False)
        self.set_epoch(epoch)
        #: keys of this rank's share the next iterator leaves out at its start (a mid-epoch resume), then back to 0
        self.skip = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, skip, self.skip = self.epoch, self.skip, 0
        return ((epoch, index) for index in list(super().__iter__())[skip:])


class EpochKeyedDataset(Dataset):
    """``dataset`` served by keys ``(epoch, index)`` (plain indices are served as they are, drawing as they would).

    Args:
        dataset: a map-style dataset.
        seed: the fit's seed.
        random_items: whether ``dataset[index]`` draws random numbers (a random per-sample transform): each
            item is then computed on torch's CPU generator seeded from ``(seed, epoch, index)``, which is given
            back afterwards. ``False`` skips the reseeding.
    """

    def __init__(self, dataset: Dataset, seed: int, random_items: bool) -> None:
        self.dataset, self.seed, self.random_items = dataset, seed, random_items

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int] | int):
        if not isinstance(key, tuple):  # a plain index (int, NumPy integer, 0-d tensor)
            return self.dataset[key]
        epoch, index = key
        if not self.random_items:
            return self.dataset[index]
        with seeded_streams(stream_seed(self.seed, ITEMS, epoch, index)):
            return self.dataset[index]


class EpochKeyedLoader(DataLoader):
    """A ``DataLoader`` over an :class:`EpochKeyedSampler` that can resume mid-epoch.

    ``state_dict()`` is ``{"epoch", "batches", "world_size", "batch_size", "length"}``: the epoch of the last
    iterator and the batches it has served (Lightning iterates sized loaders without fetching ahead, so served is
    trained; the same on every rank, so rank 0's, the one Lightning saves, serves all), with the shape of the share
    they were counted in. After ``load_state_dict``, an iterator over that same epoch starts after those batches (at
    most ``batches_done()``: the batches the Trainer counts as done once it has restarted, fewer when a checkpoint
    was saved inside a step); over another epoch, from its start. A step of all ranks reads the next
    ``world_size * batch_size`` places of the epoch's order, so a resume on another share with that product
    unchanged reads the rest of the epoch exactly; with another product, or a dataset of another length, skipping
    as many batches keeps Lightning's batch count (the epoch ends where it expects) but not the epoch's samples,
    and a warning says so. Rebuilt by Lightning around another sampler (``overfit_batches``, prediction), it
    iterates as a plain ``DataLoader``.
    """

    def __init__(self, *args, batches_done: Callable[[], int] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._batches_done = batches_done
        self._epoch: int | None = None
        self._served = 0
        self._resume: dict | None = None

    def state_dict(self) -> dict:
        """The position to resume from. Restored but not yet iterated (a checkpoint saved after a resume and before
        the first training batch, e.g. at the end of a validation the resumed fit re-runs first), it is the restored
        position, as iterating would take it: the next resume then starts where this one would have."""
        if self._resume is not None:
            state = dict(self._resume)
            done = self._batches_done() if self._batches_done is not None else None
            if state.get("batches") and done is not None:
                state["batches"] = min(state["batches"], done)
            return state
        return {"epoch": self._epoch, "batches": self._served, **self._shape()}

    def _shape(self) -> dict:
        """What a served batch count means: this run's world size, batch size and dataset length."""
        sampler = self.sampler
        return {"world_size": getattr(sampler, "num_replicas", 1), "batch_size": self.batch_size,
                "length": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state)

    def __iter__(self):
        sampler = self.sampler
        if not isinstance(sampler, EpochKeyedSampler) or self.batch_size is None:
            yield from super().__iter__()
            return
        # runs at the first batch asked for: after Lightning has loaded the state and restarted its counts
        resume, self._resume = self._resume, None
        served = resume["batches"] if resume is not None and resume.get("epoch") == sampler.epoch else 0
        done = self._batches_done() if self._batches_done is not None else None
        if served and done is not None:
            served = min(served, done)
        elif done and resume is None:
            warnings.warn(f"resumed {done} batches into epoch {sampler.epoch} from a checkpoint without this loader's "
                          "position (written before loaders kept it): the epoch's order starts again", stacklevel=2)
        shape = self._shape()
        saved = {k: resume.get(k) or shape[k] for k in shape} if served else shape  # older states: this run's
        # a step reads the next world_size * batch_size places of the epoch's order: skipping as many batches of
        # this rank's share skips the places read when that product is the checkpoint's
        sampler.skip = served * self.batch_size
        step, saved_step = shape["world_size"] * shape["batch_size"], saved["world_size"] * saved["batch_size"]
        if saved["length"] != shape["length"] or saved_step != step:
            warnings.warn(f"resumed {served} batches into epoch {sampler.epoch} with {shape['world_size']} x "
                          f"{shape['batch_size']} samples a step over {shape['length']}, the checkpoint's epoch read "
                          f"{saved['world_size']} x {saved['batch_size']} over {saved['length']}: the rest of this "
                          "epoch may read some samples twice and miss others (the next epochs are whole)", stacklevel=2)
        self._epoch, self._served = sampler.epoch, served
        for batch in super().__iter__():
            self._served += 1
            yield batch


def process_share(trainer) -> tuple[int, int]:
    """``(rank, world_size)`` of the share of every epoch this process reads, as Lightning would shard a plain
    loader: the Trainer's DDP share (``distributed_sampler_kwargs``); all of it (``(0, 1)``) where the Trainer is
    not distributed or has ``use_distributed_sampler=False`` (every process then reads the whole epoch, in the
    same order). Without a Trainer (a loader made outside ``fit``), the default process group's rank and size
    when one is initialized, else ``(0, 1)``."""
    if trainer is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1
    connector = getattr(trainer, "_accelerator_connector", None)
    if connector is not None and not getattr(connector, "use_distributed_sampler", True):
        return 0, 1
    shard = trainer.distributed_sampler_kwargs or {}
    return shard.get("rank", 0), shard.get("num_replicas", 1)


def epoch_keyed_loader(dataset: Dataset, *, seed: int, trainer, batch_size: int, random_items: bool,
                       **loader_args) -> EpochKeyedLoader:
    """A shuffled, resumable training loader over ``dataset`` whose order and per-sample draws are keyed by
    ``(seed, epoch, index)`` (:class:`EpochKeyedSampler`, :class:`EpochKeyedDataset`, :class:`EpochKeyedLoader`),
    for ``trainer``'s current epoch (``None``: epoch 0) and this process's share of the data
    (:func:`process_share`); its workers' seeds come from ``seed`` too, not the global stream. ``loader_args`` go
    to ``DataLoader`` (``num_workers``, ``drop_last``, ...)."""
    epoch, batches_done = 0, None
    rank, world_size = process_share(trainer)
    if trainer is not None:
        epoch = trainer.current_epoch
        batches_done = lambda: epoch_progress(trainer).ready  # noqa: E731
    sampler = EpochKeyedSampler(dataset, seed=seed, epoch=epoch, rank=rank, world_size=world_size)
    return EpochKeyedLoader(EpochKeyedDataset(dataset, seed, random_items), batch_size=batch_size, sampler=sampler,
                            generator=torch.Generator().manual_seed(stream_seed(seed, WORKERS)),
                            batches_done=batches_done, **loader_args)
