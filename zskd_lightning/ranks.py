"""The processes of a run: how many, and one object from each (plain ``torch.distributed``, no Lightning)."""

from __future__ import annotations

from typing import Any

import torch


def world_size() -> int:
    """The number of processes of the initialized process group (1 without one)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_world_size() if distributed else 1


def every_rank(obj: Any) -> list[Any]:
    """``obj`` of every process, in rank order: a collective under an initialized process group (every rank must
    call it), ``[obj]`` without one. Objects are pickled (``all_gather_object``)."""
    size = world_size()
    if size == 1:
        return [obj]
    gathered: list[Any] = [None] * size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered
