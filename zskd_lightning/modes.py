"""Train/eval mode that comes back as it was, submodule by submodule (a user's frozen BatchNorm stays frozen)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def evaluating(module: nn.Module | None) -> Iterator[None]:
    """``module`` (``None``: nothing) in eval mode for the block; afterwards every submodule is back in the mode
    it had (``module.train()`` would put a submodule its owner keeps in eval mode into train mode).

    Modes are restored through ``train(mode)``, parents before children, so a module whose ``train`` override
    does more than set ``.training`` (freezes a stage, switches a cache) runs it; each submodule's own call
    comes last and leaves it in its recorded mode."""
    if module is None:
        yield
        return
    modes = [(submodule, submodule.training) for submodule in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for submodule, training in modes:  # modules() is pre-order: parents first
            submodule.train(training)
