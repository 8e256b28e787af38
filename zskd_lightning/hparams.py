"""What a module's checkpoint keeps of its init arguments: the specs the ``zskd`` CLI built networks from, never
the network objects themselves (a checkpoint must load with ``weights_only=True``)."""

from __future__ import annotations

import inspect
from typing import Any

from lightning.pytorch.core.mixins import HyperparametersMixin
from lightning.pytorch.utilities.parsing import collect_init_args
from torch import nn


def cli_given_spec(name: str) -> dict[str, Any] | None:
    """The ``class_path``/``init_args`` the ``zskd`` CLI used for init argument ``name`` of the module being built.

    LightningCLI hands a module's YAML config to ``save_hyperparameters``; recording a network's spec lets a
    checkpoint rebuild its architecture later. ``None`` outside the CLI (plain Python construction).
    """
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # pragma: no cover - private API moved
        return None
    spec = (_given_hyperparameters.get() or {}).get(name)
    return dict(spec) if isinstance(spec, dict) and "class_path" in spec else None


def module_valued_init_args() -> list[str]:
    """Names of the caller's init arguments whose values are ``nn.Module`` objects, over the whole chain of
    ``__init__`` calls building the object (a subclass's own arguments too, as ``save_hyperparameters`` collects
    them): arguments to leave out of the hyperparameters. Call it from the ``__init__`` that saves them."""
    caller = inspect.currentframe().f_back
    names: list[str] = []
    for level in collect_init_args(caller, [], classes=(HyperparametersMixin,)):
        names += [name for name, value in level.items() if isinstance(value, nn.Module) and name not in names]
    return names
