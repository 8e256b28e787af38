"""Identities derived from constructor arguments, as Lightning's ``save_hyperparameters`` records them.

A class deriving from :class:`Recorded` remembers the arguments its outermost constructor was called with,
defaults included, so nothing has to be listed by hand: a new constructor argument is part of the identity the
moment it exists. :func:`describe` turns such an object (and the lists, dicts and other recorded objects in its
arguments) into plain JSON, named by a stable name (the class attribute ``identity_name``, default the class
name; never the module path, so moving a file changes no identity).
"""

from __future__ import annotations

import functools
import inspect
import math
import os
from collections.abc import Mapping
from typing import Any

from zskd_lightning.errors import InvalidArgument


def _recorded_arguments(init: Any, instance: object, args: tuple, kwargs: dict) -> dict[str, Any]:
    """``init``'s bound arguments with defaults; ``**kwargs`` merged in, completed with the defaults of the
    parents' constructors they are forwarded to (so a parent's default is recorded too)."""
    bound = inspect.signature(init).bind(instance, *args, **kwargs)
    bound.apply_defaults()
    recorded: dict[str, Any] = {}
    forwarded = False
    for name, value in list(bound.arguments.items())[1:]:
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            recorded.update(value)
            forwarded = True
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            recorded[name] = list(value)
        else:
            recorded[name] = value
    if forwarded:
        for parent in type(instance).__mro__[1:]:
            parent_init = parent.__dict__.get("__init__")
            if parent_init is None or parent is object:
                continue
            for name, parameter in inspect.signature(parent_init).parameters.items():
                if parameter.default is not inspect.Parameter.empty and name not in recorded:
                    recorded[name] = parameter.default
    return recorded


class Recorded:
    """Remembers its constructor's arguments in ``self.init_arguments`` (the outermost subclass's call)."""

    identity_name: str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return

        @functools.wraps(init)
        def recording_init(self: Recorded, *args: Any, **kwargs: Any) -> None:
            if "init_arguments" not in self.__dict__:
                self.init_arguments = _recorded_arguments(init, self, args, kwargs)
            init(self, *args, **kwargs)

        cls.__init__ = recording_init  # type: ignore[method-assign]

    @property
    def stable_name(self) -> str:
        return type(self).__dict__.get("identity_name") or type(self).__name__  # a subclass is another method


def describe(value: Any, where: str = "") -> Any:
    """Plain JSON for ``value``: recorded objects as ``{"name": ..., "args": {...}}``, containers recursively.

    Raises:
        InvalidArgument: a value that has no stable description (e.g. a module or a function), naming where.
    """
    if isinstance(value, Recorded):
        arguments = value.__dict__.get("init_arguments", {})
        return {"name": value.stable_name,
                "args": {k: describe(v, f"{where}.{k}" if where else k) for k, v in sorted(arguments.items())}}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, os.PathLike):  # a path given as a Path describes as the same path given as a string
        return os.fspath(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidArgument(f"{where or 'value'} must be finite, got {value}")
        return value
    if isinstance(value, Mapping):
        return {str(k): describe(v, f"{where}.{k}" if where else str(k)) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [describe(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise InvalidArgument(
        f"{where or 'value'} of type {type(value).__name__} has no stable description for an impression cache's "
        "identity; pass plain values (numbers, strings, lists) or library components"
    )
