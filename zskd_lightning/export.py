"""The distilled student as a file a user can deploy: its weights in safetensors (no pickle, so loading runs no
code) and, beside them, a JSON record of what the network is and what it takes.

``student.safetensors`` holds the ``state_dict``; ``student.json`` holds::

    {"format": "zskd-student", "version": 1,
     "class_path": "zskd_lightning.models.LeNet5Half", "init_args": {...} or null,
     "input_shape": [C, H, W], "input_mean": [...] or null, "input_std": [...] or null,
     "num_classes": K, "teacher": {"checkpoint": ..., "fingerprint": ...}, "test_accuracy": null or percent,
     "weights_sha256": sha256 of student.safetensors, "library_version": ...}

``init_args`` is known when the student was configured by class path (the ``zskd`` CLI, YAML); a student built
in Python records ``null``, and :func:`load_student` then needs the ``network``. ``weights_sha256`` pairs the record
with its weights: :func:`load_student` refuses weights the record does not describe (records written before the
field existed lack it and load unchecked).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from safetensors.torch import load, save
from torch import nn

from zskd_lightning._version import __version__
from zskd_lightning.errors import InvalidArgument, ZSKDError, described
from zskd_lightning.files import record_path, write_atomic, write_text_atomic
from zskd_lightning.records import STUDENT_FORMAT, VERSIONS
from zskd_lightning.records import read_record as read_weights_record
from zskd_lightning.teacher import check_weights_pair, instantiate, load_weights, read_file_bytes


def write_student(student: nn.Module, path: str | os.PathLike, *, spec: Mapping[str, Any] | None,
                  input_shape: Sequence[int] | None, input_mean: Sequence[float] | None,
                  input_std: Sequence[float] | None, num_classes: int | None,
                  teacher: Mapping[str, Any] | None) -> tuple[str, str]:
    """Write ``student``'s weights to ``path`` (a ``*.safetensors`` file) and its record beside it, each atomically.

    ``spec``: the student's ``{"class_path", "init_args"}`` when known (else the class is recorded alone).
    Returns ``(weights_path, record_path)``.
    """
    path = os.fspath(path)
    json_path = record_path(path)
    if os.path.splitext(path)[1].lower() == ".json":  # the record's own name (a case-blind file system too)
        raise InvalidArgument(f"cannot export the student's weights to {path}: the record beside the weights is "
                              "written to the .json name; give a weights file, e.g. student.safetensors")
    if not path.endswith(".safetensors"):  # load_student finds the weights beside their record by this suffix
        raise InvalidArgument(f"cannot export the student's weights to {path}: they are a safetensors file, named "
                              "*.safetensors (load_student finds them beside their .json record by that name)")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    state = {k: v.detach().cpu().clone().contiguous() for k, v in student.state_dict().items()}  # no shared storage
    weights = save(state)

    def forget_unpaired_record() -> None:  # the new weights are on disk, not yet in place
        try:
            with open(json_path) as handle:
                earlier = json.load(handle)
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            earlier = None
        if not isinstance(earlier, dict) or earlier.get("weights_sha256") is None:
            os.remove(json_path)  # a record that cannot tell other weights from its own

    # A write that fails (the weights' or their rename) leaves an earlier export whose record carries
    # weights_sha256 whole (an earlier record without it is removed first: its weights then load no more); a
    # crash between the weights' rename and the record's write leaves new weights beside the earlier record,
    # whose weights_sha256 no longer matches (refused on load), or without a record.
    write_atomic(path, lambda handle: handle.write(weights), before_replace=forget_unpaired_record)
    cls = type(student)
    record = {
        "format": STUDENT_FORMAT,
        "version": VERSIONS[STUDENT_FORMAT],
        "class_path": spec["class_path"] if spec else f"{cls.__module__}.{cls.__qualname__}",
        "init_args": dict(spec.get("init_args") or {}) if spec else None,
        "input_shape": list(input_shape) if input_shape is not None else None,
        "input_mean": list(input_mean) if input_mean is not None else None,
        "input_std": list(input_std) if input_std is not None else None,
        "num_classes": num_classes,
        "teacher": dict(teacher) if teacher else None,
        "test_accuracy": None,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "library_version": __version__,
    }
    write_text_atomic(json_path, json.dumps(record, indent=2) + "\n")
    return path, json_path


def update_record(weights_path: str | os.PathLike, **fields: Any) -> None:
    """Set ``fields`` (e.g. ``test_accuracy``) in the record beside ``weights_path``."""
    json_path = record_path(weights_path)
    record = read_record(json_path)
    record.update(fields)
    write_text_atomic(json_path, json.dumps(record, indent=2) + "\n")


def read_record(json_path: str | os.PathLike) -> dict[str, Any]:
    """The student record at ``json_path``, checked to be one (one-line error otherwise)."""
    try:
        return read_weights_record(json_path, what="student record", expected_format=STUDENT_FORMAT)
    except FileNotFoundError:
        raise ZSKDError(f"student record not found: {os.fspath(json_path)} (it is written beside the .safetensors "
                        "file)") from None


def load_student(path: str | os.PathLike, network: nn.Module | None = None,
                 map_location: str | torch.device = "cpu") -> nn.Module:
    """The exported student, weights loaded, in eval mode: one call.

    Args:
        path: the ``.safetensors`` file (its ``.json`` record must lie beside it) or the ``.json`` record.
        network: the architecture to load the weights into; needed when the record's ``init_args`` is null (a
            student built in Python), else built from the record. Only classes of ``zskd_lightning.models`` or
            ``torchvision.models`` are built from a record; give any other as ``network``.
        map_location: where the weights go.

    The record (input shape, normalization, classes, teacher, test accuracy) is at ``model.zskd_record``.
    """
    path = os.fspath(path)
    weights = os.path.splitext(path)[0] + ".safetensors" if path.endswith(".json") else path
    json_path = record_path(weights)
    record = read_record(json_path)
    data = read_file_bytes(weights, "student weights")  # read once: the bytes checked are the bytes loaded
    check_weights_pair(weights, data, record, json_path)
    if network is None:
        if record["init_args"] is None:
            raise ZSKDError(f"student record {json_path} names {record['class_path']} without its "
                            "init_args (it was built in Python): pass the architecture, load_student(path, network=...)")
        network = instantiate({"class_path": record["class_path"], "init_args": record["init_args"]},
                              source=f"student record {json_path}",
                              remedy="build the architecture yourself and pass it: load_student(path, network=...)")
    try:
        state = load(data)
    except Exception as err:  # not a safetensors file, truncated
        raise ZSKDError(f"could not read student weights {weights}: {described(err)}") from err
    load_weights(network, state, weights)
    network.zskd_record = record
    return network.to(map_location).eval()
