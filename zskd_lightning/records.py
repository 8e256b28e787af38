"""The JSON record beside a ``.safetensors`` weights file (``student.safetensors`` -> ``student.json``): what the
weights are (``class_path``, ``init_args``) and where they came from, in one of the formats this library writes.

One reader serves every caller: :func:`~zskd_lightning.export.load_student` (a student record is required) and
a teacher's ``checkpoint`` (a record is optional; one in a format of this library is checked like any other).
"""

from __future__ import annotations

import json
import os
from typing import Any

from zskd_lightning.errors import ZSKDError, first_line

#: an exported student's record (:mod:`zskd_lightning.export`)
STUDENT_FORMAT = "zskd-student"
#: a benchmark teacher's record (``benchmarks/teachers.py``)
TEACHER_FORMAT = "zskd-teacher"
#: each record format this library writes, and the one version of it this library writes and reads
VERSIONS = {STUDENT_FORMAT: 1, TEACHER_FORMAT: 1}
#: keys every record of this library's formats holds
REQUIRED_KEYS = ("class_path", "init_args")


def read_record(json_path: str | os.PathLike, what: str = "record", expected_format: str | None = None) -> Any:
    """The parsed record at ``json_path`` (``what`` it is, for the one-line errors).

    ``expected_format``: the record must be a JSON object in that format (else refused). Without it, a JSON object
    whose ``format`` is one of :data:`VERSIONS` is checked as that format, and any other JSON is returned
    as it is (a record written by other tools). A record in one of this library's formats must have the version
    this library reads and hold :data:`REQUIRED_KEYS`.

    Raises:
        FileNotFoundError: no file at ``json_path`` (the caller says whether a record was required).
        ZSKDError: one line naming ``json_path``: unreadable, not JSON, another format or version, keys missing.
    """
    json_path = os.fspath(json_path)
    try:
        with open(json_path) as handle:
            record = json.load(handle)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as err:
        raise ZSKDError(f"could not read the {what} {json_path}: {first_line(err)}") from err
    kind = record.get("format") if isinstance(record, dict) else None
    if expected_format is not None and kind != expected_format:
        raise ZSKDError(f"{json_path} is not a {what} (expected format {expected_format!r}, got {kind!r})")
    if not (isinstance(kind, str) and kind in VERSIONS):
        return record
    if record.get("version") != VERSIONS[kind]:
        raise ZSKDError(f"{what} {json_path} has version {record.get('version')!r} of format {kind!r}; this library "
                        f"reads version {VERSIONS[kind]}")
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        raise ZSKDError(f"{what} {json_path} lacks {', '.join(missing)}")
    return record
