"""The processes of a run: how many, one object from each (plain ``torch.distributed``), stopping them together, and
closing them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from zskd_lightning.errors import ZSKDError


def world_size() -> int:
    """The number of processes of the initialized process group (1 without one)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_world_size() if distributed else 1


def close_process_group() -> None:
    """Destroy the default process group once a DDP run has ended well on every rank (call it last, in every
    process): gloo's threads left to the interpreter's exit can abort it (SIGABRT, "terminate called without an
    active exception") after the work is done. Not after an error: a rank still inside a collective would leave
    the others waiting. Without a process group, nothing."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def every_rank(obj: Any) -> list[Any]:
    """``obj`` of every process, in rank order: a collective under an initialized process group (every rank must
    call it), ``[obj]`` without one. Objects are pickled (``all_gather_object``)."""
    size = world_size()
    if size == 1:
        return [obj]
    gathered: list[Any] = [None] * size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def raise_together(strategy: Any | None, problem: str | BaseException | None, elsewhere: Callable[[], str]) -> None:
    """Stop every rank when any has a ``problem``: a collective (every rank calls it at the same point) through
    ``strategy.reduce_boolean_decision`` (a Lightning strategy; ``None``: this process decides alone). This rank's
    own problem is raised as it is (an exception) or as a one-line :class:`ZSKDError` (a message); a rank without
    one raises ``ZSKDError(elsewhere())``, so no rank is left waiting in a later collective for one that stopped."""
    fine = problem is None
    if strategy is not None:
        fine = strategy.reduce_boolean_decision(fine, all=True)
    if isinstance(problem, BaseException):
        raise problem
    if problem is not None:
        raise ZSKDError(problem)
    if not fine:
        raise ZSKDError(elsewhere())
