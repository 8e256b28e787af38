"""What a module's checkpoint keeps of its init arguments: the specs the ``zskd`` CLI built networks from, never
the network objects themselves (a checkpoint must load with ``weights_only=True``)."""

from __future__ import annotations

import copy
import inspect
import io
import os
from typing import Any

from lightning.pytorch.core.mixins import HyperparametersMixin
from lightning.pytorch.utilities.parsing import collect_init_args
from torch import nn

from zskd_lightning.errors import InvalidArgument, ZSKDError, refuse_unpickling
from zskd_lightning.files import resolve_packaged
from zskd_lightning.teacher import check_class_paths, read_checkpoint, read_file_bytes


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
    return dict(spec) if _is_spec(spec) else None


def module_valued_init_args() -> list[str]:
    """Names of the caller's init arguments whose values are ``nn.Module`` objects, over the whole chain of
    ``__init__`` calls building the object (a subclass's own arguments too, as ``save_hyperparameters`` collects
    them): arguments to leave out of the hyperparameters. Call it from the ``__init__`` that saves them."""
    caller = inspect.currentframe().f_back
    names: list[str] = []
    for level in collect_init_args(caller, [], classes=(HyperparametersMixin,)):
        names += [name for name, value in level.items() if isinstance(value, nn.Module) and name not in names]
    return names


def _is_spec(value: Any) -> bool:
    return isinstance(value, dict) and "class_path" in value


class _NamedBytes(io.BytesIO):
    """A checkpoint's bytes, already read, that Lightning's messages name by the file they came from."""

    def __init__(self, data: bytes, path: str) -> None:
        super().__init__(data)
        self.path = path

    def __repr__(self) -> str:
        return self.path

    __str__ = __repr__


class LoadsRecordedSpecs:
    """``load_from_checkpoint`` for a LightningModule whose networks (``spec_args``) the ``zskd`` CLI built from
    ``class_path``/``init_args`` specs. Put it before ``LightningModule`` among the bases.

    Lightning rebuilds a loaded module outside the CLI, where ``save_hyperparameters`` sees network objects and
    keeps no spec; the module loaded here gets the checkpoint's specs (and how to build from them) back, so its
    exports and its own checkpoints rebuild the networks as the first run did.
    """

    #: Init arguments that are networks: each recorded in the checkpoint (a CLI run) or given to the load.
    spec_args: tuple[str, ...] = ()

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None,
                             weights_only: bool | None = True, **kwargs):
        """Lightning's ``load_from_checkpoint``, loaded with ``weights_only=True`` (this library never unpickles a
        file: ``weights_only`` set to False is refused in one line). Each of ``spec_args`` comes from the
        checkpoint's record or from ``kwargs``; a class the record names must be in ``zskd_lightning``,
        ``torchvision.models`` or an already imported module. ``checkpoint_path`` is a local file (or a packaged
        ``zskd_lightning:`` one), read once (the checkpoint whose specs are checked is the one built, even if the
        file is replaced meanwhile; Lightning reads the bytes, so it offers no ``upgrade_checkpoint`` hint for a
        checkpoint of an older Lightning); a ``.safetensors`` file (weights only: ``load_student``, or a teacher's
        ``checkpoint``) and ``hparams_file`` (it would replace the specs checked here) are refused in one line."""
        refuse_unpickling(weights_only, f"{cls.__name__}.load_from_checkpoint reads checkpoints")
        if hparams_file is not None:
            raise InvalidArgument(f"{cls.__name__}.load_from_checkpoint takes no hparams_file: the networks are built "
                                  "from the specs the checkpoint records; give other init arguments as keywords")
        if not isinstance(checkpoint_path, (str, os.PathLike)) or "://" in os.fspath(checkpoint_path):
            raise InvalidArgument(f"{cls.__name__}.load_from_checkpoint reads a local checkpoint file by its path, got "
                                  f"{checkpoint_path!r}: save or copy it to a file first")
        path = resolve_packaged(os.fspath(checkpoint_path))
        if path.endswith(".safetensors"):
            raise InvalidArgument(f"{path} holds a network's weights, not a {cls.__name__} checkpoint: load it with "
                                  "zskd_lightning.load_student(path), or give it as a teacher's checkpoint")
        data = read_file_bytes(path, "checkpoint")  # read once: the checkpoint checked is the checkpoint built
        hparams = read_checkpoint(path, what="checkpoint", data=data).get("hyper_parameters") or {}
        missing = [name for name in cls.spec_args if name not in kwargs and not _is_spec(hparams.get(name))]
        if missing:
            raise ZSKDError(
                f"checkpoint {path} does not record the {' and '.join(missing)} (the module was built in Python, not "
                f"from a config): pass {' and '.join(missing)}, e.g. {cls.__name__}.load_from_checkpoint(path, "
                + ", ".join(f"{name}=..." for name in missing) + ")"
            )
        recorded = {name: value for name, value in hparams.items() if name not in kwargs and _is_spec(value)}
        for name, spec in recorded.items():
            check_class_paths(spec, source=f"checkpoint {path} ({name})")
        model = super().load_from_checkpoint(_NamedBytes(data, path), map_location=map_location, strict=strict,
                                             weights_only=True, **kwargs)
        recorded = {name: spec for name, spec in recorded.items() if not _is_spec(model._hparams.get(name))}
        if recorded and "_instantiator" in hparams:
            recorded["_instantiator"] = hparams["_instantiator"]
        for store in (model._hparams, model._hparams_initial):
            store.update(copy.deepcopy(recorded))
        return model
