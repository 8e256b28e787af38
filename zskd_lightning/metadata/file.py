"""The metadata file a teacher's owner ships beside the model (Lopes et al. 2017): per-class activation statistics
in one safetensors file (no pickle: reading it runs no code), with a JSON header under the key ``"zskd"``.

Tensors, per recorded layer ``L`` (a module path): ``L/count`` ``[K]``, ``L/mean`` ``[K, d]``, ``L/std`` ``[K, d]``,
and ``L/covariance`` ``[K, d, d]`` (kept ``"full"``) or ``L/variance`` ``[K, d]`` (kept ``"diagonal"``), float64.
Header: format and version, the teacher's fingerprint, the temperature the logits were divided by, each layer's
activation shape and what was kept, the library version.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import Tensor

from zskd_lightning._version import __version__
from zskd_lightning.errors import ZSKDError, described
from zskd_lightning.files import write_atomic
from zskd_lightning.metadata.statistics import ClassMoments

FORMAT, VERSION = "zskd-activation-metadata", 1
#: The key under which the logits (divided by the temperature) are recorded.
LOGITS = "logits"


@dataclass(frozen=True)
class LayerRecord:
    """One layer's statistics: ``count [K]``, ``mean [K, d]``, ``std [K, d]``, ``spread`` (``[K, d, d]``
    covariance when ``kept == "full"``, else ``[K, d]`` variances), and the activation ``shape`` (without batch)."""

    shape: tuple[int, ...]
    kept: str
    count: Tensor
    mean: Tensor
    std: Tensor
    spread: Tensor


@dataclass(frozen=True)
class Metadata:
    """A read metadata file: its ``header``, its ``layers`` by module path, and the file's ``sha256``."""

    header: dict[str, Any]
    layers: dict[str, LayerRecord]
    sha256: str

    @property
    def teacher_fingerprint(self) -> str:
        return self.header["teacher_fingerprint"]


def write_metadata(path: str | os.PathLike, layers: Mapping[str, ClassMoments], shapes: Mapping[str, Sequence[int]],
                   teacher_fingerprint: str, temperature: float) -> int:
    """Write the statistics of ``layers`` (activation ``shapes`` by layer) atomically; returns the file's size in
    bytes. Raises :class:`ZSKDError` for a class with fewer than 2 samples, or no :data:`LOGITS` layer."""
    if not layers:
        raise ZSKDError(f"no statistics to write to {os.fspath(path)}: nothing was recorded")
    if LOGITS not in layers:
        raise ZSKDError(f"{os.fspath(path)}: no {LOGITS!r} statistics among {sorted(layers)} (every Lopes objective "
                        "matches them; ActivationRecorder records them)")
    tensors: dict[str, Tensor] = {}
    described = {}
    for name, moments in layers.items():
        spread = moments.covariance()
        tensors[f"{name}/count"] = moments.count.clone()
        tensors[f"{name}/mean"] = moments.mean.clone()
        tensors[f"{name}/std"] = moments.std().contiguous()
        tensors[f"{name}/{'covariance' if moments.kept == 'full' else 'variance'}"] = spread.contiguous()
        described[name] = {"shape": [int(s) for s in shapes[name]], "dim": moments.dim, "kept": moments.kept}
    header = {"format": FORMAT, "version": VERSION, "teacher_fingerprint": teacher_fingerprint,
              "temperature": float(temperature), "num_classes": next(iter(layers.values())).num_classes,
              "layers": described, "library_version": __version__}
    payload = save(tensors, metadata={"zskd": json.dumps(header)})  # unsorted: the layers keep their recorded order
    write_atomic(path, lambda handle: handle.write(payload))
    return len(payload)


def read_metadata(path: str | os.PathLike, teacher_fingerprint: str | None = None) -> Metadata:
    """Read and check a metadata file; with ``teacher_fingerprint``, refuse another teacher's. One-line errors
    for a missing, truncated, corrupt or foreign file."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            payload = handle.read()
    except FileNotFoundError:
        raise ZSKDError(f"metadata file not found: {path}") from None
    except OSError as err:
        raise ZSKDError(f"cannot read metadata file {path}: {err.strerror or err}") from err
    try:
        tensors = load(payload)
        header = json.loads(_safetensors_header(payload).get("__metadata__", {}).get("zskd", "null"))
    except (SafetensorError, ValueError, KeyError, TypeError) as err:
        raise ZSKDError(f"metadata file {path} is corrupt or truncated ({described(err)})") from err
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ZSKDError(f"{path} is not an activation metadata file (no {FORMAT!r} header)")
    if header.get("version") != VERSION:
        raise ZSKDError(f"metadata file {path} has version {header.get('version')!r}; this library reads {VERSION}")
    missing = [key for key in ("teacher_fingerprint", "layers", "num_classes", "temperature") if key not in header]
    if missing:
        raise ZSKDError(f"metadata file {path} lacks {', '.join(missing)} in its header")
    if teacher_fingerprint is not None and header["teacher_fingerprint"] != teacher_fingerprint:
        raise ZSKDError(f"metadata file {path} was recorded from teacher {header['teacher_fingerprint'][:12]}, not from "
                        f"this teacher ({teacher_fingerprint[:12]})")
    classes, temperature = header["num_classes"], header["temperature"]
    if not _is_positive_int(classes) or not isinstance(header["layers"], dict):
        raise ZSKDError(f"metadata file {path} has num_classes {classes!r} (a positive integer expected) or layers "
                        "that are not a mapping")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ZSKDError(f"metadata file {path} has temperature {temperature!r}; expected a positive number")
    if LOGITS not in header["layers"]:
        raise ZSKDError(f"metadata file {path} has no {LOGITS!r} statistics (every Lopes objective matches them); "
                        f"it holds {sorted(header['layers'])}")
    layers = {}
    for name, info in header["layers"].items():
        missing = [k for k in ("shape", "dim", "kept") if not isinstance(info, dict) or k not in info]
        if missing:
            raise ZSKDError(f"metadata file {path} lacks {missing} of layer {name!r}")
        dim, kept, shape = info["dim"], info["kept"], info["shape"]
        if not _is_positive_int(dim) or kept not in ("full", "diagonal"):
            raise ZSKDError(f"metadata file {path}: layer {name!r} has dim {dim!r} and kept {kept!r}; expected a "
                            "positive integer and 'full' or 'diagonal'")
        spread_key = "covariance" if kept == "full" else "variance"
        expected = {"count": (classes,), "mean": (classes, dim), "std": (classes, dim),
                    spread_key: (classes, dim, dim) if kept == "full" else (classes, dim)}
        missing = [k for k in expected if f"{name}/{k}" not in tensors]
        if missing:
            raise ZSKDError(f"metadata file {path} lacks {missing} of layer {name!r}")
        wrong = [k for k, shape in expected.items() if tuple(tensors[f"{name}/{k}"].shape) != shape]
        if wrong:
            has = ", ".join(f"{k} {list(tensors[f'{name}/{k}'].shape)}" for k in wrong)
            want = ", ".join(f"{k} {list(expected[k])}" for k in wrong)
            raise ZSKDError(f"metadata file {path}: layer {name!r} has {has}; expected {want} (num_classes "
                            f"{classes}, dim {dim}, kept {kept!r})")
        if not (isinstance(shape, list) and all(map(_is_positive_int, shape)) and math.prod(shape) == dim):
            raise ZSKDError(f"metadata file {path}: layer {name!r} has shape {shape!r}; expected a list of positive "
                            f"integers whose product is its dim {dim}")
        if name == LOGITS and dim != classes:
            raise ZSKDError(f"metadata file {path}: {LOGITS!r} has dim {dim}; expected num_classes {classes}")
        layers[name] = LayerRecord(tuple(shape), kept, tensors[f"{name}/count"], tensors[f"{name}/mean"],
                                   tensors[f"{name}/std"], tensors[f"{name}/{spread_key}"])
    return Metadata(header, layers, hashlib.sha256(payload).hexdigest())


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _safetensors_header(payload: bytes) -> dict[str, Any]:
    """The JSON header of a safetensors payload (8-byte little-endian length, then the JSON)."""
    length = int.from_bytes(payload[:8], "little")
    if len(payload) < 8 or length > len(payload) - 8:
        raise ValueError("header length beyond the end of the file")
    return json.loads(payload[8 : 8 + length])
