"""Random streams that survive a resume: per-batch seeded streams, and the global generators in checkpoints.

Three things make a resumed run draw what an unstopped one would:

- :func:`seeded_streams` runs a block (e.g. a batch's augmentation) on the global generators seeded from a key
  such as ``(run seed, batch count, rank)``, then gives the generators back as they were: the block draws the
  same numbers whenever it runs, and the stream outside it does not move.
- :class:`TrainingStreams` holds a fit's seed and its count of batches drawn for, the keys of those blocks, for a
  datamodule's ``state_dict``.
- :func:`capture_states` / :func:`restore_states` read and set the global generators (Python, NumPy, torch's CPU
  generator and the device's), for a checkpoint: :func:`gather_states` collects every rank's (given ones, or
  captured now) under DDP, since Lightning writes rank 0's checkpoint only.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch

from zskd_lightning.ranks import every_rank


def stream_seed(*keys: int) -> int:
    """A 63-bit seed derived from integer ``keys`` (e.g. ``(seed, batch, rank)``) by NumPy's ``SeedSequence``:
    keys differing anywhere give independent streams."""
    sequence = np.random.SeedSequence([int(k) for k in keys])
    return int(sequence.generate_state(1, np.uint64)[0] >> 1)


@contextlib.contextmanager
def seeded_streams(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the block on torch's CPU generator and ``device``'s own (CUDA, MPS, ...) seeded with ``seed``; both
    are restored afterwards, and other devices' generators are left alone."""
    device = torch.device(device)
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
        return
    backend = getattr(torch, device.type)  # torch.cuda, torch.mps, torch.xpu, ...
    index = device.index if device.index is not None else (backend.current_device() if hasattr(
        backend, "current_device") else 0)
    with torch.random.fork_rng(devices=[index], device_type=device.type):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.default_generators[index].manual_seed(seed)
        else:
            backend.manual_seed(seed)  # the current device of its type (MPS has one)
        yield


class TrainingStreams:
    """A fit's random keys: its seed (rank 0's torch initial seed at the fit's start, ``seed_everything``'s) and
    how many training batches have drawn from per-batch streams so far. Batch ``n`` of rank ``r`` draws from
    ``stream_seed(seed, 0xA06, n, r)`` (the same count on every rank); the state goes into checkpoints."""

    BATCH = 0xA06  # the key that sets per-batch streams apart from other uses of the seed

    def __init__(self) -> None:
        self.seed: int | None = None
        self.batches = 0
        self._last_key: object = None  # the key of the batch that drew last (next_batch_seed's ``key``)

    def start(self) -> None:
        """A new fit: rank 0's global seed now, no batches yet (a resumed fit loads its state after this). A
        collective under an initialized process group: every rank calls it (a datamodule's ``setup("fit")``)
        and keys its streams from one seed, whatever seeds the ranks were given."""
        self.seed, self.batches, self._last_key = every_rank(torch.initial_seed())[0], 0, None

    def run_seed(self) -> int:
        """The fit's seed (taken now if no fit has started: a loader used outside a Trainer)."""
        if self.seed is None:
            self.seed = torch.initial_seed()
        return self.seed

    def next_batch_seed(self, rank: int, key: object = None) -> int:
        """The seed of the next training batch's stream on ``rank``; counts the batch. ``key`` names the batch
        (e.g. the Trainer's ``(epoch, index)``) for :meth:`state_dict`'s ``unfinished``."""
        seed = stream_seed(self.run_seed(), self.BATCH, self.batches, rank)
        self.batches += 1
        self._last_key = key
        return seed

    def state_dict(self, unfinished: object = None) -> dict:
        """``{"augmentation_seed", "augmented_batches"}`` (the names checkpoints have held them under).
        ``unfinished``: the key of the batch a fit resumed from this state fetches first (begun and not finished,
        or fetched and not begun): if it was the last to draw, its draw is not counted, so the redone batch draws
        the same."""
        spent = unfinished is not None and unfinished == self._last_key
        return {"augmentation_seed": self.seed, "augmented_batches": self.batches - int(spent)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.seed = state_dict.get("augmentation_seed", self.seed)
        self.batches = state_dict.get("augmented_batches", 0)
        self._last_key = None  # no batch of this state has drawn in this process


def capture_states(device: torch.device | str = "cpu") -> dict:
    """This process's global generators: ``{"python", "numpy", "torch", "device"}`` (``device``: the CUDA
    device's state, ``None`` on other devices, whose generators are not kept), as tensors, lists and numbers (no
    pickled NumPy objects)."""
    device = torch.device(device)
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "device": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def restore_states(states: dict, device: torch.device | str = "cpu") -> None:
    """Set this process's global generators to ``states`` (from :func:`capture_states`)."""
    device = torch.device(device)
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.cpu().numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"].cpu())  # a checkpoint loaded with map_location="cuda" moved them
    if device.type == "cuda" and states["device"] is not None:
        torch.cuda.set_rng_state(states["device"].cpu(), device)


def gather_states(device: torch.device | str = "cpu", states: dict | None = None) -> list[dict]:
    """Every rank's ``states`` (``None``: its :func:`capture_states` now), in rank order (a collective under an
    initialized process group; ``[own]`` without one)."""
    return every_rank(capture_states(device) if states is None else states)
