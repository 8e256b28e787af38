"""Named intermediate activations of a model, by module path: every forward hook of the library is made here.

A :class:`Tap` names a submodule (``"features.3"``, ``"classifier.fc2"``; ``""`` is the model itself) and
whether its ``output`` or its (first) ``input`` is wanted. :class:`FeatureTaps` records the tapped tensors
during a forward pass (hooks attached on entering the block and removed on leaving it, even on error);
:func:`replacing` substitutes a given tensor for a tapped activation, which runs the rest of a network from an
intermediate layer (:func:`run_from`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from zskd_lightning.errors import InvalidArgument, ZSKDError
from zskd_lightning.modes import evaluating


@dataclass(frozen=True)
class Tap:
    """One activation of a model: the ``output`` or the first ``input`` of the submodule at ``path``."""

    path: str
    where: Literal["output", "input"] = "output"

    def __post_init__(self) -> None:
        if self.where not in ("output", "input"):
            raise InvalidArgument(f"a tap's `where` is 'output' or 'input', got {self.where!r}")

    @property
    def key(self) -> str:
        """The name the activation has in a response's ``features``: the path, ``":input"`` appended for inputs."""
        return self.path if self.where == "output" else f"{self.path}:input"


def submodule(model: nn.Module, path: str) -> nn.Module:
    """``model``'s submodule at ``path``, or a one-line error naming the model and a few valid paths."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name][:8]
        raise ZSKDError(
            f"{type(model).__name__} has no submodule {path!r} (some of its module paths: {names})"
        ) from None


class FeatureTaps:
    """Within ``with FeatureTaps(model, taps) as taps:`` every forward pass of ``model`` fills ``taps.features``
    (``{tap.key: tensor}``, in the order the hooks fired; a later pass overwrites). Tensors keep their graph.

    A tapped module that runs twice in one forward pass of ``model`` (one module reused, e.g. a ResNet block's
    ReLU) is a one-line error: its activation would be whichever call came last."""

    def __init__(self, model: nn.Module, taps: Iterable[Tap]) -> None:
        self.model = model
        self.taps = list(dict.fromkeys(taps))
        self.features: dict[str, Tensor] = {}
        self._pass = _ForwardPass(type(model).__name__)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> FeatureTaps:
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._pass.begin, prepend=True))
            self._handles.append(self.model.register_forward_hook(self._pass.end, always_call=True))
            for tap in self.taps:
                module = submodule(self.model, tap.path)
                if tap.where == "output":
                    hook = _output_recorder(self.features, tap.key, self._pass)
                    self._handles.append(module.register_forward_hook(hook))
                else:
                    hook = _input_recorder(self.features, tap.key, self._pass)
                    self._handles.append(module.register_forward_pre_hook(hook))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def clear(self) -> None:
        self.features.clear()


class _ForwardPass:
    """Which taps fired during the current forward pass of the tapped model (none outside one: a module called
    on its own, or recomputed by activation checkpointing during backward, is recorded unchecked)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.running = False
        self.fired: set[str] = set()

    def begin(self, module: nn.Module, inputs: tuple) -> None:
        self.running = True
        self.fired.clear()

    def end(self, module: nn.Module, inputs: tuple, output: object) -> None:
        self.running = False

    def fire(self, key: str) -> None:
        if not self.running:
            return
        if key in self.fired:
            self.running = False
            raise ZSKDError(f"the tapped activation {key!r} ran twice in one forward pass of {self.model_name} (one "
                            "module used at two places): tap a module that runs once, or give each use its own")
        self.fired.add(key)


def _output_recorder(store: dict[str, Tensor], key: str, forward: _ForwardPass):
    def record_output(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        forward.fire(key)
        store[key] = output

    return record_output


def _input_recorder(store: dict[str, Tensor], key: str, forward: _ForwardPass):
    def record_input(module: nn.Module, inputs: tuple) -> None:
        if not inputs:
            raise ZSKDError(f"the tapped module {key!r} was called with keyword arguments only: its input cannot be "
                            "tapped; tap its output or a module before it")
        forward.fire(key)
        store[key] = inputs[0]

    return record_input


@contextlib.contextmanager
def replacing(model: nn.Module, tap: Tap, value: Tensor) -> Iterator[None]:
    """Within the block, the activation at ``tap`` is ``value`` in every forward pass of ``model``. Each pass gets
    a copy: an in-place layer after the tap (``ReLU(inplace=True)``) must not change the caller's ``value``."""
    module = submodule(model, tap.path)
    if tap.where == "output":
        handle = module.register_forward_hook(lambda m, inputs, output: value.clone())
    else:
        handle = module.register_forward_pre_hook(lambda m, inputs: (value.clone(), *inputs[1:]))
    try:
        yield
    finally:
        handle.remove()


def run_from(model: nn.Module, tap: Tap, value: Tensor, input_shape: tuple[int, ...]) -> Tensor:
    """``model``'s output when the activation at ``tap`` is ``value [N, ...]``: the rest of the network run on it.

    The layers before ``tap`` still run, on a zero input ``[N, *input_shape]``, and are overridden there. To
    check that nothing after ``tap`` reads them too (a skip connection around it), the pass is repeated on a
    second input (standard normal, fixed seed); different outputs end in a one-line error, and so does a tapped
    module that runs more than once a pass (each call would be given ``value``). The passes run in eval mode (the
    network's prediction: BatchNorm reads its running statistics and leaves them, Dropout keeps every unit), and
    each module's mode is put back after through its ``train`` (:func:`~zskd_lightning.modes.evaluating`).
    """
    device = value.device
    second = torch.randn((len(value), *input_shape), generator=torch.Generator().manual_seed(0)).to(device)
    outputs, calls = [], []
    counting = submodule(model, tap.path).register_forward_pre_hook(lambda module, inputs: calls.append(1))
    try:
        with evaluating(model), replacing(model, tap, value):
            for inputs in (torch.zeros((len(value), *input_shape), device=device), second):
                outputs.append(model(inputs))
    finally:
        counting.remove()
    if not calls:
        raise ZSKDError(f"{type(model).__name__} never runs {tap.path!r} in a forward pass (a branch that runs only in "
                        "training, or a module called through its weights): model a layer the forward pass runs")
    if len(calls) != len(outputs):
        raise ZSKDError(f"{type(model).__name__} runs {tap.path!r} {len(calls) / len(outputs):g} times a forward pass "
                        "(one module used at two places): model a layer that runs once")
    if not torch.allclose(outputs[0], outputs[1], rtol=1e-4, atol=1e-5):
        raise ZSKDError(
            f"{type(model).__name__}'s layers after {tap.key!r} also read earlier activations (the output changed "
            "with the input while that activation was fixed): choose a layer that every later layer depends on only "
            "through it"
        )
    return outputs[0]
