"""Frozen teachers: loading from checkpoints, freezing, fingerprinting.

A teacher is any classifier ``nn.Module`` mapping ``[B, C, H, W]`` inputs to ``[B, num_classes]`` logits.
:class:`FrozenTeacher` wraps one so that it has no trainable parameters, stays in eval mode through
Lightning's train/eval toggling, is never handed to an optimizer, and holds no subnormal weights
(:func:`flush_subnormals`).
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import pickle
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from safetensors.torch import load, load_file
from torch import nn

from zskd_lightning.checks import probe_num_outputs
from zskd_lightning.errors import InvalidArgument, ZSKDError, described, first_line
from zskd_lightning.files import record_path, resolve_packaged
from zskd_lightning.kernels import default_layout, use_fast_kernels
from zskd_lightning.records import read_record

#: State-dict prefixes under which the library's LightningModules keep a network.
_CHECKPOINT_PREFIXES = ("network.", "student.")
#: Prefixes wrappers put on every key of the network they wrap: DDP / DataParallel, ``torch.compile``.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


#: Modules whose ``nn.Module`` classes a checkpoint may name as its recorded architecture. Any other class a
#: checkpoint names is refused before its module is imported (an import alone can run code); give such a
#: teacher's ``network`` in the config instead, which is the user's own choice.
TRUSTED_NETWORK_MODULES = ("zskd_lightning.models", "torchvision.models")


def read_checkpoint(path: str, what: str = "teacher checkpoint", sha256: str | None = None,
                    data: bytes | None = None) -> dict[str, Any]:
    """Load a checkpoint file onto the CPU without running code from it; any failure becomes a one-line
    :class:`ZSKDError` naming ``path`` (``what`` it is).

    A ``.safetensors`` file holds tensors only; the JSON record beside it (``student.safetensors`` ->
    ``student.json``, as :func:`~zskd_lightning.export.write_student` and the benchmark teachers write it) gives
    the architecture, returned as a Lightning checkpoint's ``hyper_parameters["network"]``. Any other file loads
    with ``torch.load(weights_only=True)`` (tensors and plain containers only). ``sha256``: the file's expected
    digest (hex); a file whose bytes differ is refused before it is read, and the bytes checked are the bytes
    loaded (read once: a file replaced meanwhile is not read again) (the weights file's bytes only: a
    ``.safetensors`` file's JSON record is not covered; give ``network`` to fix the architecture). ``data``: the
    file's bytes, already read by the caller (:func:`read_file_bytes`), parsed instead of reading ``path`` again.
    """
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", str(sha256)):
        raise InvalidArgument(f"sha256 of the {what} must be the 64 hex digits of the file's bytes (as `sha256sum` "
                              f"prints them, without the file name; not a teacher fingerprint), got {sha256!r}")
    path = resolve_packaged(os.fspath(path))
    checked = data
    if checked is None and not os.path.isfile(path):
        raise ZSKDError(f"{what} not found: {path}")
    if sha256 is not None:
        if checked is None:
            checked = read_file_bytes(path, what)
        actual = hashlib.sha256(checked).hexdigest()
        if actual != sha256.lower():
            raise ZSKDError(f"{what} {path} has sha256 {actual}, expected {sha256.lower()}: the file changed since "
                            "its digest was recorded")
    if path.endswith(".safetensors"):
        return _read_safetensors(path, what, checked)
    try:
        obj = torch.load(path if checked is None else io.BytesIO(checked), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        pickled = re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module \S+ is blocked)", str(err))
        if pickled is None:  # not a pickle of tensors at all: another format, or bytes that are no file of torch's
            raise ZSKDError(f"could not read checkpoint {path}: not a torch.save file of tensors (a state_dict or a "
                            "Lightning checkpoint; a safetensors file must be named *.safetensors): "
                            f"{first_line(err)[:200]}") from err
        raise ZSKDError(
            f"checkpoint {path} holds pickled Python objects ({pickled.group(1)}), which are "
            "never loaded (they could run code); re-save only its tensors, e.g. torch.save(model.state_dict(), "
            "path), and give the architecture as the teacher's `network`"
        ) from err
    except Exception as err:  # corrupt, truncated, not a torch file
        raise ZSKDError(f"could not read checkpoint {path}: {described(err)}") from err
    if not isinstance(obj, Mapping):
        raise ZSKDError(f"checkpoint {path} holds a {type(obj).__name__}, expected a state_dict or a Lightning checkpoint")
    return dict(obj)


def read_file_bytes(path: str, what: str) -> bytes:
    """The bytes of the file at ``path`` (``what`` it is, for the one-line error when it cannot be read)."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise ZSKDError(f"{what} not found: {path}") from None
    except OSError as err:
        raise ZSKDError(f"could not read {what} {path}: {described(err)}") from err


def check_weights_pair(path: str, data: bytes, record: Mapping[str, Any], json_path: str) -> None:
    """Refuse (one line) weights ``data`` read from ``path`` that the record at ``json_path`` does not describe:
    its ``weights_sha256`` names other bytes (the weights changed, or an export stopped between writing them and
    their record). A record without the field (written before it existed) pairs with any weights."""
    expected = record.get("weights_sha256")
    if expected is not None and (actual := hashlib.sha256(data).hexdigest()) != expected:
        raise ZSKDError(f"weights {path} have sha256 {actual}, but their record {json_path} describes {expected}: "
                        "they changed, or an export stopped before its record; export again")


def _read_safetensors(path: str, what: str, data: bytes | None = None) -> dict[str, Any]:
    """``{"state_dict": tensors}`` from a safetensors file (``data``: its bytes, already read), plus the
    architecture of the JSON record beside it (refused when the record's ``weights_sha256`` names other bytes)."""
    json_path = record_path(path)
    try:
        record = read_record(json_path)
    except FileNotFoundError:
        record = None
    if isinstance(record, Mapping) and record.get("weights_sha256") is not None:
        if data is None:  # read once: the bytes checked are the bytes loaded
            data = read_file_bytes(path, what)
        check_weights_pair(path, data, record, json_path)  # before parsing: refused as unpaired, readable or not
    try:
        state = load_file(path, device="cpu") if data is None else load(data)
    except Exception as err:  # truncated, not a safetensors file
        raise ZSKDError(f"could not read {what} {path}: {described(err)}") from err
    content: dict[str, Any] = {"state_dict": state}
    if isinstance(record, Mapping) and record.get("class_path") and record.get("init_args") is not None:
        content["hyper_parameters"] = {"network": {"class_path": record["class_path"],
                                                   "init_args": dict(record["init_args"])}}
    return content


def network_state_dict(checkpoint: Mapping[str, Any], path: str = "<checkpoint>",
                       network_keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The network's weights from a plain ``state_dict`` or a Lightning checkpoint of this library's modules.
    ``network_keys``: the loading network's ``state_dict`` keys; weights whose keys are exactly those are the
    network's as they are (a child of it named ``network`` or ``student`` is not a module's attribute)."""
    state = checkpoint.get("state_dict", checkpoint)
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ZSKDError(f"checkpoint {path} has no tensor state_dict (keys: {sorted(state)[:5]}...)")
    if network_keys is not None and set(state) == network_keys:
        return dict(state)
    for prefix in _CHECKPOINT_PREFIXES:
        stripped = _under(state, prefix)
        if stripped:
            state = stripped
            break
    return _unwrapped(dict(state))


def _under(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` whose keys start with ``prefix``, the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _unwrapped(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the prefixes a wrapper puts on EVERY key (``module.`` of DDP, ``_orig_mod.`` of
    ``torch.compile``), however nested."""
    while state:
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            return state
        state = _under(state, prefix)
    return state


def network_spec(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``{"class_path", "init_args"}`` of the network recorded in a Lightning checkpoint, if any."""
    hparams = checkpoint.get("hyper_parameters") or {}
    spec = hparams.get("network")
    if isinstance(spec, Mapping) and "class_path" in spec:
        return {"class_path": spec["class_path"], "init_args": dict(spec.get("init_args") or {})}
    return None


def instantiate(spec: Mapping[str, Any], bases: tuple[type, ...] = (nn.Module,),
                modules: Sequence[str] = TRUSTED_NETWORK_MODULES, source: str = "checkpoint",
                remedy: str = "give the teacher's `network` (class_path and init_args) in your config instead") -> Any:
    """Build ``class_path(**init_args)``, ``class_path`` dicts in ``init_args`` (also inside lists) too, but only
    classes that live in one of ``modules`` (checked BEFORE importing anything) and derive from ``bases``.
    ``remedy``: what the caller can do instead when a class lies outside ``modules`` (ends that line).

    Raises:
        ZSKDError: one line naming ``source``, the class path and why it is refused.
    """
    class_path = str(spec.get("class_path", ""))
    module_name, _, class_name = class_path.rpartition(".")
    if not any(module_name == m or module_name.startswith(m + ".") for m in modules):
        raise ZSKDError(
            f"{source} names class_path {class_path!r}, outside the modules allowed here ({', '.join(modules)}); "
            f"{remedy}"
        )
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ZSKDError(f"{source}: cannot import class_path {class_path!r}: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, bases)):
        names = " or ".join(base.__name__ for base in bases)
        raise ZSKDError(f"{source} names class_path {class_path!r}, which is not a {names} class")
    return cls(**{k: _built(v, bases, modules, source, remedy) for k, v in (spec.get("init_args") or {}).items()})


def check_class_paths(spec: Any, source: str, modules: Sequence[str] = ("zskd_lightning", *TRUSTED_NETWORK_MODULES)) -> None:
    """Refuse (one line naming ``source``) any ``class_path`` in ``spec`` (nested dicts and lists too) whose module is
    neither in ``modules`` nor already imported: building from a file must not import new code."""
    if isinstance(spec, Mapping):
        if "class_path" in spec:
            module_name = str(spec["class_path"]).rpartition(".")[0]
            if not (module_name in sys.modules or any(module_name == m or module_name.startswith(m + ".") for m in modules)):
                raise ZSKDError(
                    f"{source} names class_path {spec['class_path']!r}, outside the modules allowed here "
                    f"({', '.join(modules)}) and not imported; import its module first if you trust the file"
                )
        for value in spec.values():
            check_class_paths(value, source, modules)
    elif isinstance(spec, list):
        for value in spec:
            check_class_paths(value, source, modules)


def _built(value: Any, bases: tuple[type, ...], modules: Sequence[str], source: str, remedy: str) -> Any:
    """An ``init_args`` value with every ``class_path`` dict in it (directly or in a list) instantiated."""
    if isinstance(value, Mapping) and "class_path" in value:
        return instantiate(value, bases, modules, source, remedy)
    if isinstance(value, list):
        return [_built(item, bases, modules, source, remedy) for item in value]
    return value


def load_weights(network: nn.Module, state: Mapping[str, torch.Tensor], path: str = "<checkpoint>") -> None:
    """``network.load_state_dict(state)`` with a one-line error listing missing/unexpected/mis-shaped keys."""
    own = network.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mis_shaped = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if own[k].shape != state[k].shape
    ]
    if missing or unexpected or mis_shaped:
        hint = _prefix_hint(missing, unexpected) if missing and unexpected else ""
        parts = [hint] if hint else []
        if missing:
            parts.append(f"missing keys {missing[:4]}{'...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
        if mis_shaped:
            parts.append(f"shape mismatch (checkpoint vs model) {mis_shaped[:3]}")
        raise ZSKDError(
            f"checkpoint {path} does not fit {type(network).__name__}: " + "; ".join(parts)
        )
    network.load_state_dict(state)


def _prefix_hint(missing: list[str], unexpected: list[str]) -> str:
    """``"its keys carry the prefix 'model.' the network's lack ..."`` when every missing key is among the
    unexpected ones under one prefix (a network kept as an attribute of the user's own LightningModule), else
    ``""``."""
    key = missing[0]
    prefixes = {u[: -len(key)] for u in unexpected if u.endswith("." + key)}
    for prefix in sorted(prefixes):
        if {prefix + m for m in missing} <= set(unexpected):
            return (f"its keys carry the prefix {prefix!r} the network's lack (a network kept as an attribute of a "
                    f"LightningModule?): re-save that attribute's state_dict(), e.g. torch.save(module."
                    f"{prefix.rstrip('.')}.state_dict(), path)")
    return ""


class FrozenTeacher(nn.Module):
    """A frozen classifier: ``requires_grad=False`` everywhere and permanently in eval mode.

    Args:
        network: the teacher architecture (``class_path``/``init_args`` in YAML). Optional when
            ``checkpoint`` is a Lightning checkpoint of :class:`~zskd_lightning.ClassifierModule` trained
            through the ``zskd`` CLI, which records the architecture.
        checkpoint: a Lightning checkpoint (``.ckpt``), a plain ``state_dict`` file (``.pt``) or a
            ``.safetensors`` file with its JSON record beside it (an exported student, a benchmark teacher under
            ``benchmarks/teachers/``). ``None`` keeps ``network``'s current weights.
        sha256: the checkpoint file's expected sha256 (hex): a file that changed is refused in one line (the
            weights file only, not the JSON record beside a ``.safetensors`` file).
        num_classes: the number of outputs, when it should not be found by running the network on a zero
            input (:meth:`count_classes`).
        fast_kernels: run the network's ``nn.LocalResponseNorm`` layers as the equivalent banded 1x1 convolution
            (:class:`~zskd_lightning.kernels.BandLocalResponseNorm`, swapped in on construction): the same logits
            up to float rounding, a faster CPU kernel (AlexNet's forward on a batch of 128 CIFAR-10 inputs, 2
            cores, ``benchmarks/distillation_step.py --pair cifar10``, commit cf7b58f: 0.91x the stock layer's time
            alone, 0.67x with ``channels_last``). Both off give the stock network's arithmetic bit for bit.
        channels_last: keep the network's 4-d weights in channels-last (NHWC) layout and give it image inputs
            ``[B, C, H, W]`` in that layout: the same logits up to float rounding; oneDNN and cuDNN run wide
            convolutions faster on it (LeNet-5's forward on CPU: no faster, no slower). A network that calls
            ``.view`` on its conv features needs ``.reshape`` (or ``False`` here: image inputs are then made
            contiguous, whatever layout they come in, e.g. an online generator's channels-last outputs).

    ``forward`` maps ``[B, C, H, W]`` to logits ``[B, num_classes]``. Subnormal weights are set to zero on
    construction (``flushed_subnormals`` counts them; :func:`flush_subnormals`), before any fingerprint is taken;
    neither the kernel swap nor the layout changes the fingerprint (the state dict keeps its names and values).
    """

    def __init__(self, network: nn.Module | None = None, checkpoint: str | None = None,
                 num_classes: int | None = None, sha256: str | None = None, fast_kernels: bool = True,
                 channels_last: bool = True) -> None:
        super().__init__()
        if network is None and checkpoint is None:
            raise ZSKDError("a teacher needs a `network`, a `checkpoint`, or both")
        if num_classes is not None and num_classes < 2:
            raise InvalidArgument(f"num_classes must be >= 2, got {num_classes}")
        if sha256 is not None and checkpoint is None:
            raise InvalidArgument("sha256 checks a teacher's checkpoint file: give `checkpoint` too")
        if checkpoint is not None:
            content = read_checkpoint(checkpoint, sha256=sha256)
            if network is None:
                spec = network_spec(content)
                if spec is None:
                    raise ZSKDError(
                        f"checkpoint {checkpoint} does not record its architecture: give the teacher's `network` "
                        "(class_path and init_args) too"
                    )
                network = instantiate(spec, source=f"checkpoint {checkpoint}")
            load_weights(network, network_state_dict(content, checkpoint, set(network.state_dict())), checkpoint)
        self.network = network
        self.checkpoint = checkpoint
        self.flushed_subnormals = flush_subnormals(network)
        if fast_kernels:
            use_fast_kernels(network)
        self.channels_last = channels_last
        if channels_last:
            network.to(memory_format=torch.channels_last)
        self.declared_classes = num_classes
        self._probed_classes: int | None = None
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Ignore ``mode``: a frozen teacher is always in eval mode (BatchNorm/Dropout frozen)."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            return self.network(x)
        if not self.channels_last:  # row-major always, e.g. for a network that .view()s its conv features
            return self.network(default_layout(x))
        try:
            return self.network(x.contiguous(memory_format=torch.channels_last))
        except RuntimeError as err:
            if "view size is not compatible" not in str(err):
                raise
            raise ZSKDError(
                f"teacher {type(self.network).__name__} calls .view on a channels-last tensor: use .reshape in its "
                "forward, or give the teacher channels_last: false (FrozenTeacher(..., channels_last=False))"
            ) from err

    def count_classes(self, input_shape: Sequence[int]) -> int:
        """The number of outputs: ``num_classes`` if given, else the width of the logits on a zero batch of
        ``input_shape`` ``(C, H, W)`` (one-line error if the network cannot take it)."""
        if self.declared_classes is not None:
            return self.declared_classes
        self._probed_classes = probe_num_outputs(self, tuple(input_shape), "teacher")
        return self._probed_classes

    @property
    def num_classes(self) -> int:
        """The declared or last counted number of classes (:meth:`count_classes` must have run otherwise)."""
        known = self.declared_classes if self.declared_classes is not None else self._probed_classes
        if known is None:
            raise ZSKDError("the teacher's number of classes is not known yet: give `num_classes`, or call "
                            "count_classes(input_shape)")
        return known

    def fingerprint(self) -> str:
        """sha256 (hex) of the network's class and weights: identifies the teacher an impression cache came from."""
        return module_fingerprint(self.network)


def as_frozen_teacher(module: nn.Module) -> FrozenTeacher:
    """Wrap ``module`` in a :class:`FrozenTeacher` with its defaults (freezing it in place, its LRN layers banded and
    its weights channels-last) unless it is one already; pass a ``FrozenTeacher`` to choose otherwise."""
    return module if isinstance(module, FrozenTeacher) else FrozenTeacher(network=module)


def classifier_layer(network: nn.Module, num_classes: int | None = None) -> nn.Linear:
    """The network's classification layer, for methods that read its weights (e.g. ZSKD's class similarity):
    the last registered ``nn.Linear`` with ``num_classes`` outputs (any width when ``None``). Registration order
    need not be execution order, hence the width check."""
    linears = [m for m in network.modules() if isinstance(m, nn.Linear)]
    if num_classes is not None:
        linears = [m for m in linears if m.out_features == num_classes]
    if not linears:
        width = f" with {num_classes} outputs" if num_classes is not None else ""
        raise ZSKDError(f"{type(network).__name__} has no nn.Linear layer{width}, whose weights this method reads as "
                        "the classifier's")
    return linears[-1]


def subnormal_mask(tensor: torch.Tensor) -> torch.Tensor:
    """Where a floating-point ``tensor`` is subnormal: 0 < |x| < the dtype's smallest normal (1.18e-38 in
    float32). Same shape, bool."""
    return (tensor.abs() < torch.finfo(tensor.dtype).tiny) & (tensor != 0)


def subnormals_flushed(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` with its subnormal values set to zero (as :func:`flush_subnormals` leaves a teacher's
    weights); a tensor that is not floating point is returned as it is."""
    return tensor.masked_fill(subnormal_mask(tensor), 0) if tensor.is_floating_point() else tensor


def flush_subnormals(module: nn.Module) -> int:
    """Set ``module``'s subnormal floating-point parameters and buffers (0 < |w| < the dtype's smallest normal,
    e.g. 1.2e-38 in float32) to zero, in place; returns how many there were.

    Why: weight decay drives the weights of dead units toward zero until they become subnormal (the MNIST LeNet-5
    teacher, Adam with weight decay 5e-4, holds 13,548 of its 61,706 weights below 1.2e-38), and x86 CPUs run
    arithmetic on subnormal operands many times slower: ``benchmarks/subnormal_weights.py`` synthesized with that
    teacher at 3,273 impression-iterations/s with them and 14,066 with them set to zero (2 CPU cores, 4.30x).
    Their products are below float32's resolution next to any normal sum, so outputs and input gradients do not
    change (that benchmark checks the teacher's impressions; a test, planted subnormals); TensorFlow's CPU
    threads flush them by default for the same reason.
    """
    count = 0
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.is_floating_point() and tensor.numel():
                subnormal = subnormal_mask(tensor)
                n = int(subnormal.sum())
                if n:
                    tensor.masked_fill_(subnormal, 0.0)
                    count += n
    return count


def module_fingerprint(network: nn.Module) -> str:
    """sha256 (hex) over the class name and every state-dict entry (name, dtype, shape, bytes)."""
    digest = hashlib.sha256(type(network).__qualname__.encode())
    for name, tensor in sorted(network.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()

