"""The impression cache: a folder of checksummed shards, one per chunk, and a manifest.

Layout of ``directory``::

    spec.json                       what defines the cache (format version, the method's identity, teacher
                                    fingerprint, input spec, chunk size, seed; not the budget); written once,
                                    compared on every run
    chunk-000012.inputs.npy         float32 [n, C, H, W]  impressions, in the teacher's input space
    chunk-000012.targets.npy        float32 [n, ...]      the method's targets they were optimized towards
    chunk-000012.labels.npy         int64   [n]           the class each was made for (apart from the targets)
    chunk-000012.json               sha256 of the three files, loss, seconds: written LAST, so a chunk counts as
                                    finished only when its record exists and every checksum matches
    manifest.json                   spec + every shard's checksums + library versions + times; written by
                                    global rank 0 once all chunks exist; its presence marks the cache complete

Every file is written to a temporary name and renamed into place (atomic on POSIX), so a synthesis killed at
any moment leaves only finished chunks and stray temporary files of the cache's own names, which the next run
deletes and redoes. Every chunk record carries the identity of its cache (``cache_id``, a digest of the spec):
a chunk of another cache (another seed, teacher or method, merged or left behind) is redone, never adopted.
Nothing but the cache's own files (the names above, their temporary names and ``.lock``) is ever deleted; a
non-empty folder that is not a cache is refused unless ``overwrite_cache`` says to use it anyway.

Chunk ``c`` holds the impressions with global indices ``[c * chunk_size, (c + 1) * chunk_size)``: every chunk
is full, so a budget of ``n`` impressions is the first ``ceil(n / chunk_size)`` chunks, read up to ``n``. A larger
budget adds chunks to the same cache, a smaller one reads fewer; nothing is made twice.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import platform
import re
import time
import warnings
from collections.abc import Iterator
from collections.abc import Mapping, Sequence
from typing import Any

import lightning
import numpy as np
import torch

from zskd_lightning._version import __version__
from zskd_lightning.errors import InvalidArgument, ZSKDError
from zskd_lightning.files import PARTIAL_SUFFIX, file_sha256, write_atomic

#: Changes on purpose whenever a cache's layout or identity changes; a cache of another format is refused.
#: 1: hand-written synthesizer settings named by module path. 2: the method's identity derived from its
#: constructor arguments and named by its stable name (``method``), the teacher's input spec (``input_spec``).
#: 3: the budget is not part of the identity and every chunk is full (format-2 caches are upgraded in place:
#: their full chunks are kept, a partial last chunk is made again).
FORMAT_VERSION = 3
#: Spec keys that size a run rather than define its impressions: left out of the identity.
BUDGET_KEYS = ("num_impressions", "num_train_impressions")
ARRAYS = ("inputs", "targets", "labels")
#: The names of the files a cache makes (and their temporary names while written): the only files it deletes.
OWN_FILE = re.compile(r"^(chunk-\d{6}\.(json|inputs\.npy|targets\.npy|labels\.npy)|spec\.json|manifest\.json)"
                      rf"({PARTIAL_SUFFIX})?$")
LOCK_FILE = ".lock"
SHARD_DTYPES = {"inputs": "float32", "targets": "float32", "labels": "int64"}


def _canonical(obj: Any) -> Any:
    """JSON round trip: tuples become lists, so specs compare equal however they were built."""
    return json.loads(json.dumps(obj, sort_keys=True))


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict with dotted keys (``synthesizer.iterations``), for naming what differs."""
    if not isinstance(obj, Mapping):
        return {prefix: obj}
    flat: dict[str, Any] = {}
    for key, value in obj.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _write_json(path: str, obj: Mapping[str, Any]) -> None:
    write_atomic(path, lambda h: h.write(json.dumps(obj, indent=2, sort_keys=True).encode()))


def _npy_header(path: str) -> tuple[str, int | None]:
    """``(dtype, rows)`` from a ``.npy`` file's header, read without loading (nor unpickling) its data."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(handle)
    return str(dtype), (shape[0] if shape else None)


def library_versions() -> dict[str, str]:
    return {
        "zskd_lightning": __version__,
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


class ImpressionCache:
    """One impression cache folder for one ``spec``.

    Args:
        directory: the folder (created on :meth:`prepare`).
        spec: JSON-serializable description; must contain ``num_impressions`` (this run's budget, not part of the
            cache's identity) and ``chunk_size``.
    """

    def __init__(self, directory: str | os.PathLike, spec: Mapping[str, Any]) -> None:
        self.directory = os.fspath(directory)
        #: The identity (``spec`` without :data:`BUDGET_KEYS`): what ``spec.json`` holds and every run compares.
        self.spec = _canonical({"format_version": FORMAT_VERSION,
                                **{k: v for k, v in spec.items() if k not in BUDGET_KEYS}})
        #: This run's budget (``num_impressions``, ``num_train_impressions``): recorded in the manifest only.
        self.budget = _canonical({k: spec[k] for k in BUDGET_KEYS if k in spec})
        self.count = int(spec["num_impressions"])
        self.chunk_size = int(self.spec["chunk_size"])
        if self.count < 1 or self.chunk_size < 1:
            raise InvalidArgument(
                f"num_impressions and chunk_size must be >= 1, got {self.count} and {self.chunk_size}"
            )
        self.num_chunks = -(-self.count // self.chunk_size)
        existing = self._read_spec()
        if existing == self.spec:  # the same identity, perhaps spelt 20.0 where we have 20: keep the folder's
            self.spec = existing   # spelling, so that its digest (below) and its chunks stay ours
        #: Digest of the spec, written into every chunk record: a chunk of another cache is never adopted.
        self.cache_id = hashlib.sha256(json.dumps(self.spec, sort_keys=True).encode()).hexdigest()[:20]

    # ------------------------------------------------------------------------------------------ layout
    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def chunk_file(self, chunk: int, kind: str) -> str:
        suffix = "json" if kind == "record" else f"{kind}.npy"
        return self.path(f"chunk-{chunk:06d}.{suffix}")

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        """Global impression indices ``[start, stop)`` of ``chunk`` (always ``chunk_size`` of them)."""
        start = chunk * self.chunk_size
        return start, start + self.chunk_size

    # ------------------------------------------------------------------------------------- spec checks
    def _read_spec(self) -> Any:
        """The folder's ``spec.json`` as parsed JSON, or ``None`` when it is absent or unreadable."""
        try:
            with open(self.path("spec.json")) as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return None

    def spec_mismatch(self) -> str | None:
        """A one-line description of how an existing cache in the folder differs from ours, else ``None``."""
        spec_path = self.path("spec.json")
        if not os.path.exists(spec_path):
            return None
        try:
            with open(spec_path) as handle:
                existing = json.load(handle)
        except (OSError, ValueError) as err:
            return f"impression cache {self.directory} has an unreadable spec.json ({err})"
        if existing == self.spec:
            return None
        found = existing.get("format_version", 1) if isinstance(existing, Mapping) else "unknown"
        older = ""
        if found == 2:  # the synthesis driver upgrades one of our identity (upgrade_format_2); name what differs
            identity = {**{k: v for k, v in existing.items() if k not in BUDGET_KEYS}, "format_version": FORMAT_VERSION}
            if identity != self.spec:
                existing, older = identity, "(a format-2 cache) "
        if found != FORMAT_VERSION and not older:
            return (
                f"impression cache {self.directory} was written in cache format {found}; this version of zskd-lightning "
                f"reads format {FORMAT_VERSION} (and upgrades format 2) and never reuses an older cache: delete the "
                "folder, use another cache_dir, or set overwrite_cache: true"
            )
        old_method = (existing.get("method") or {}).get("name")
        new_method = (self.spec.get("method") or {}).get("name")
        if old_method != new_method:
            return (
                f"impression cache {self.directory} {older}holds {old_method!r} impressions, not {new_method!r}: use "
                "another cache_dir, delete the folder, or set overwrite_cache: true"
            )
        cached, now = _flatten(existing), _flatten(self.spec)
        differing = sorted(k for k in set(cached) | set(now) if cached.get(k) != now.get(k))
        what = "was made by a different teacher" if "teacher_fingerprint" in differing else "has other settings"
        details = ", ".join(f"{k}: cached {cached.get(k)!r} vs now {now.get(k)!r}" for k in differing)
        if len(details) > 400:
            details = details[:400] + "..."
        return (
            f"impression cache {self.directory} {older}{what} ({details}); use another cache_dir, delete the folder, "
            "or set overwrite_cache: true"
        )

    def prepare(self, overwrite: bool = False) -> None:
        """Create the folder, check or write ``spec.json``, delete the cache's own half-written files. Global rank 0.

        A mismatching cache is an error unless ``overwrite``, which deletes the old cache's own files; a folder
        holding other files and no cache is an error unless ``overwrite`` (its files are kept, never deleted).
        A format-2 cache is refused here like any other; :meth:`upgrade_format_2` (which the synthesis driver
        runs first) adopts one of the same identity.
        """
        mismatch = self.spec_mismatch()
        if mismatch and not overwrite:
            raise ZSKDError(mismatch)
        self._make_folder()
        self.refuse_foreign_folder(overwrite)
        names = os.listdir(self.directory)
        for name in names:
            if not OWN_FILE.match(name):
                continue
            if name.endswith(".tmp") or (mismatch and overwrite):  # half-written, or the replaced cache's
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path(name))
        if not os.path.exists(self.path("spec.json")):
            _write_json(self.path("spec.json"), self.spec)

    def refuse_foreign_folder(self, overwrite: bool) -> None:
        """A folder holding other files and no impression cache is an error unless ``overwrite`` (its files are then
        kept beside the cache). Reads only: the synthesis driver asks before it takes the lock, so a refused folder
        is left as it was (no ``.lock`` file)."""
        if overwrite or not os.path.isdir(self.directory):
            return
        names = os.listdir(self.directory)
        foreign = sorted(n for n in names if not OWN_FILE.match(n) and n != LOCK_FILE)
        if foreign and "spec.json" not in names:
            raise ZSKDError(
                f"cache_dir {self.directory} is not empty and holds no impression cache ({len(foreign)} other "
                f"file(s), e.g. {foreign[0]!r}); use an empty or new folder, or set overwrite_cache: true to put the "
                "cache beside them (they are never deleted)"
            )

    def upgrade_format_2(self) -> int | None:
        """Adopt a format-2 cache (its identity included the budget, its last chunk could be partial) of the same
        identity: full chunks are re-labelled with this cache's id (their shards and checksums stay), a partial
        chunk is deleted (it is made again, full), and ``spec.json`` is rewritten; safe to interrupt and redo.

        Returns the number of chunks kept, or ``None`` when the folder holds no such cache. Global rank 0.
        """
        existing = self._read_spec()
        if not isinstance(existing, Mapping) or existing.get("format_version") != 2:
            return None
        identity = {k: v for k, v in existing.items() if k not in BUDGET_KEYS and k != "format_version"}
        if identity != {k: v for k, v in self.spec.items() if k != "format_version"}:
            return None
        old_id = hashlib.sha256(json.dumps(existing, sort_keys=True).encode()).hexdigest()[:20]
        kept = 0
        for name in sorted(os.listdir(self.directory)):
            match = re.fullmatch(r"chunk-(\d{6})\.json", name)
            if not match:
                continue
            chunk = int(match.group(1))
            try:
                with open(self.path(name)) as handle:
                    record = json.load(handle)
            except (OSError, ValueError):
                continue  # unreadable: redone like any broken chunk
            if record.get("cache_id") in (old_id, self.cache_id) and record.get("count") == self.chunk_size:
                _write_json(self.path(name), {**record, "cache_id": self.cache_id})
                kept += 1
            else:
                for kind in ("record", *ARRAYS):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self.chunk_file(chunk, kind))
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path("manifest.json"))
        _write_json(self.path("spec.json"), self.spec)
        return kept

    def _make_folder(self) -> None:
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise ZSKDError(f"cache_dir {self.directory} is a file, not a folder")
        os.makedirs(self.directory, exist_ok=True)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the cache's OS file lock (``.lock``; released by the OS if the process dies). Global rank 0 of a
        run takes it for the whole synthesis, so two runs never fill one folder at once: as far as the file
        system's ``flock`` reaches (across nodes on NFS v4 and most parallel file systems; a Lustre mount with
        ``localflock`` locks per node). A file system without ``flock`` gets a warning and no lock.

        Raises:
            ZSKDError: another process holds it (named by its process id).
        """
        self._make_folder()
        handle = open(self.path(LOCK_FILE), "a+")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locking = True
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                raise ZSKDError(
                    f"impression cache {self.directory} is being filled by another run (process {holder}); wait for "
                    "it to finish, or use another cache_dir"
                ) from None
            except OSError as err:  # a file system without flock (some Lustre mounts): ENOSYS, EOPNOTSUPP, ENOLCK
                if err.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK):
                    raise
                warnings.warn(f"the file system of {self.directory} has no file locks ({err.strerror}): nothing stops "
                              "two runs from filling this cache at once; start one at a time")
                locking = False
            if locking:
                handle.seek(0)
                handle.truncate()
                handle.write(f"{os.getpid()} on {platform.node()}")
                handle.flush()
            yield
        finally:
            handle.close()  # releases the lock

    # ------------------------------------------------------------------------------------------ chunks
    def chunk_problem(self, chunk: int) -> str | None:
        """Why ``chunk`` is not a finished chunk of this cache (``None`` if it is): its record is missing or
        unreadable, belongs to another cache, counts other rows, or a shard does not match its checksum."""
        record_path = self.chunk_file(chunk, "record")
        if not os.path.exists(record_path):
            return "not made yet"
        try:
            with open(record_path) as handle:
                record = json.load(handle)
            if record.get("cache_id") != self.cache_id:
                return "its record belongs to another cache (other seed, teacher, method or settings)"
            start, stop = self.chunk_range(chunk)
            if record.get("count") != stop - start:
                return f"its record counts {record.get('count')} impressions, not {stop - start}"
            for kind in ARRAYS:
                if not os.path.exists(self.chunk_file(chunk, kind)):
                    return f"its {kind} shard is missing"
                if file_sha256(self.chunk_file(chunk, kind)) != record["sha256"][kind]:
                    return f"its {kind} shard does not match its checksum (corrupt or changed)"
                dtype, rows = _npy_header(self.chunk_file(chunk, kind))
                if dtype != SHARD_DTYPES[kind] or rows != stop - start:
                    return f"its {kind} shard holds {rows} rows of {dtype}, not {stop - start} of {SHARD_DTYPES[kind]}"
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            return f"its record is unreadable ({type(err).__name__})"
        return None

    def chunk_problems(self) -> dict[int, str]:
        """``{chunk: why}`` for every chunk that is not a finished chunk of this cache (one checksum pass)."""
        problems = {c: self.chunk_problem(c) for c in range(self.num_chunks)}
        return {c: why for c, why in problems.items() if why is not None}

    def missing_chunks(self) -> list[int]:
        return sorted(self.chunk_problems())

    def write_chunk(
        self,
        chunk: int,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        labels: torch.Tensor,
        loss: float,
        seconds: float,
        impression_iterations: int = 0,
    ) -> None:
        """Write one chunk's shards atomically, then its record (which marks it finished)."""
        start, stop = self.chunk_range(chunk)
        arrays = {
            "inputs": inputs.float().numpy(),
            "targets": targets.float().numpy(),
            "labels": labels.long().numpy(),
        }
        for kind, array in arrays.items():  # every check before any write: a refused chunk leaves no file
            if array.shape[0] != stop - start:
                raise ValueError(f"chunk {chunk}: {kind} has {array.shape[0]} rows, expected {stop - start}")
            if kind != "labels" and not np.isfinite(array).all():
                raise ZSKDError(
                    f"chunk {chunk} of impression cache {self.directory}: the synthesized {kind} hold non-finite values "
                    "(NaN or inf), so nothing of it is written; check that the teacher's outputs are finite and lower "
                    "the synthesis lr"
                )
        self._make_folder()  # a node that does not share rank 0's folder writes its chunks into its own
        for kind, array in arrays.items():
            write_atomic(self.chunk_file(chunk, kind), lambda h, a=array: np.save(h, np.ascontiguousarray(a)))
        record = {
            "cache_id": self.cache_id,
            "chunk": chunk,
            "count": stop - start,
            "final_loss": loss,
            "seconds": seconds,
            "impression_iterations": impression_iterations,
            "sha256": {kind: file_sha256(self.chunk_file(chunk, kind)) for kind in ARRAYS},
        }
        _write_json(self.chunk_file(chunk, "record"), record)

    # ---------------------------------------------------------------------------------------- manifest
    def write_manifest(self, wall_seconds: float, resumed_chunks: Sequence[int] = ()) -> dict[str, Any]:
        """Verify the chunks and write ``manifest.json``. Global rank 0, after all ranks finished.

        ``wall_seconds`` is this run's wall time; ``resumed_chunks`` are the chunks an earlier, interrupted run
        finished, whose summed synthesis seconds the manifest records as ``resumed_seconds``: this run verified
        them when it started (under the cache's lock), so only the other chunks are checksummed here.
        """
        resumed = set(resumed_chunks)
        missing = [c for c in range(self.num_chunks) if c not in resumed and self.chunk_problem(c) is not None]
        if missing:
            raise ZSKDError(
                f"impression cache {self.directory} lacks {len(missing)} finished chunk(s) (first: {missing[:5]}); "
                "on several nodes the cache_dir must be one shared folder (or merge the nodes' chunk-* files into "
                "one folder and run again)"
            )
        shards = []
        for chunk in range(self.num_chunks):
            with open(self.chunk_file(chunk, "record")) as handle:
                shards.append(json.load(handle))
        synthesis_seconds = sum(record["seconds"] for record in shards)
        iterations = sum(record.get("impression_iterations", 0) for record in shards)
        shards += self._shards_beyond_budget()
        manifest = {
            **self.spec,
            **self.budget,
            "shards": shards,
            "versions": library_versions(),
            "synthesis_seconds_total": synthesis_seconds,
            "impression_iterations_total": iterations,
            "impression_iterations_per_second": iterations / synthesis_seconds if synthesis_seconds else None,
            "wall_seconds": wall_seconds,
            "resumed_chunks": len(resumed_chunks),
            "resumed_seconds": sum(shards[chunk]["seconds"] for chunk in resumed_chunks),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        _write_json(self.path("manifest.json"), manifest)
        return manifest

    def _shards_beyond_budget(self) -> list[Mapping[str, Any]]:
        """The stored manifest's shard records past this budget's chunks, when it is this cache's: a smaller
        budget that makes a chunk again (a damaged one) keeps them, so the manifest never shrinks and a larger
        budget's run still finds its cache complete (its checksums are checked when it reads the cache)."""
        manifest = self.stored_manifest()
        if manifest is None or {k: manifest.get(k) for k in self.spec} != self.spec:
            return []
        later = list(manifest.get("shards", ()))[self.num_chunks:]
        ours = all(isinstance(shard, Mapping) and shard.get("cache_id") == self.cache_id for shard in later)
        return later if ours else []

    def stored_manifest(self) -> Mapping[str, Any] | None:
        """The folder's ``manifest.json`` as written, whatever its spec and budget (``None``: absent, unreadable)."""
        try:
            with open(self.path("manifest.json")) as handle:
                manifest = json.load(handle)
        except (OSError, ValueError):
            return None
        return manifest if isinstance(manifest, Mapping) else None

    def read_manifest(self) -> dict[str, Any] | None:
        """The manifest if it was made with our spec and covers our budget (a larger budget's covers ours too),
        else ``None``."""
        manifest = self.stored_manifest()
        if manifest is None:
            return None
        spec_part = {k: manifest.get(k) for k in self.spec}
        shards = manifest.get("shards", ())
        if spec_part != self.spec or len(shards) < self.num_chunks:
            return None
        # every shard names its cache's digest: an identity key the manifest has and our spec lacks (e.g. a bf16
        # cache's "autocast" read by a float32 run) is caught here, not only the keys we have
        ours = all(isinstance(shard, Mapping) and shard.get("cache_id") == self.cache_id
                   for shard in shards[:self.num_chunks])
        return manifest if ours else None

    def is_complete(self, verify: bool = True) -> bool:
        """A manifest matching our spec exists (and, with ``verify``, every shard's checksum still matches)."""
        manifest = self.read_manifest()
        if manifest is None:
            return False
        return not verify or not self.missing_chunks()

    def load(self, kind: str, start: int = 0, stop: int | None = None) -> list[np.ndarray]:
        """Memory-mapped read-only arrays of ``kind`` holding rows ``[start, stop)`` (not copied), one per chunk:
        the first cut at ``start``, the last at ``stop`` (default: this budget's ``count``). Each map holds a file
        open while it lives: for rows of a cache of thousands of chunks use
        :class:`~zskd_lightning.impressions.shards.ShardReader` (as training and the pictures do)."""
        stop = self.count if stop is None else stop
        first, last = start // self.chunk_size, -(-stop // self.chunk_size)
        arrays = [np.load(self.chunk_file(c, kind), mmap_mode="r") for c in range(first, last)]
        if arrays:
            arrays[-1] = arrays[-1][: stop - (last - 1) * self.chunk_size]
            arrays[0] = arrays[0][start - first * self.chunk_size :]
        return arrays
