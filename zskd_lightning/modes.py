"""Train/eval mode that comes back as it was, submodule by submodule (a user's frozen BatchNorm stays frozen)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def evaluating(module: nn.Module | None) -> Iterator[None]:
    """``module`` (``None``: nothing) in eval mode for the block; afterwards every submodule is back in the mode
    it had (``module.train()`` would put a submodule its owner keeps in eval mode into train mode)."""
    if module is None:
        yield
        return
    modes = [(submodule, submodule.training) for submodule in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for submodule, training in modes:
            submodule.training = training
