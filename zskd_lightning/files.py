"""Crash-safe file writes (a reader sees the old file or the new one, never a half-written one), file digests
packaged paths, and the JSON record that sits beside a weights file."""

from __future__ import annotations

import csv
import hashlib
import importlib.resources
import io
import os
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import BinaryIO


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object],
                 before_replace: Callable[[], object] | None = None) -> None:
    """Call ``write(handle)`` on a temporary file beside ``path``, sync it, then rename it over ``path``
    (``before_replace()`` runs just before the rename, once the new content is safely on disk).

    The temporary name (:func:`partial_path`) is new for every write, so processes (on one node or several
    sharing a file system) and threads writing into one folder, even the same file, never write into each
    other's temporary file: the last rename wins whole.
    """
    path = os.fspath(path)
    partial = partial_path(path)
    try:
        with open(partial, "xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(partial, path)
        _sync_folder(os.path.dirname(os.path.abspath(path)))
    finally:
        if os.path.exists(partial):
            os.remove(partial)


#: What :func:`partial_path` appends to a name (and what releases before it appended, ``.<pid>.tmp``): a regular
#: expression, for code that recognizes the half-written files a crash leaves behind.
PARTIAL_SUFFIX = r"\.\d+(-[0-9a-f]{8})?\.tmp"


def partial_path(path: str) -> str:
    """``path`` + ``.<pid>-<8 random hex digits>.tmp``: the temporary name of one :func:`write_atomic` call."""
    return f"{path}.{os.getpid()}-{secrets.token_hex(4)}.tmp"


def _sync_folder(folder: str) -> None:
    """Make a rename into ``folder`` survive a power loss (POSIX; a no-op where folders cannot be opened)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) in one step."""
    write_atomic(path, lambda handle: handle.write(text.encode()))


def write_csv_atomic(path: str | os.PathLike, rows: Iterable[Mapping[str, object]], fieldnames: Sequence[str]) -> None:
    """Replace the CSV at ``path`` (header ``fieldnames``, then ``rows``) in one step."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fieldnames))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


#: A path that starts with this names a file shipped inside the installed package, e.g.
#: ``zskd_lightning:configs/quickstart.yaml`` or ``zskd_lightning:assets/digits_teacher.pt``: it resolves the
#: same from any working folder, editable install or not.
PACKAGED = "zskd_lightning:"


def resolve_packaged(path: str) -> str:
    """``path`` with a leading ``zskd_lightning:`` replaced by the installed package's folder; others unchanged."""
    if not isinstance(path, str) or not path.startswith(PACKAGED):
        return path
    return str(importlib.resources.files("zskd_lightning").joinpath(path[len(PACKAGED):]))


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of the file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def record_path(weights_path: str | os.PathLike) -> str:
    """The JSON record beside a weights file (``student.safetensors`` -> ``student.json``)."""
    return os.path.splitext(os.fspath(weights_path))[0] + ".json"
