"""Rows of a cache's ``.npy`` shards, read without holding one open file per shard.

A memory map holds a file descriptor until it is closed (CPython's ``mmap`` keeps a duplicate of the file's;
``trackfd=False`` exists only from Python 3.13). A process that mapped every shard of a cache of 1,000 chunks
(Lopes' MNIST config: 64,000 impressions in chunks of 64, two shards each) would hold 2,000 open files, past the
common soft limit of 1,024 a process (each loader worker is a process of its own), and stop with "Too many open
files" in its first epoch. :class:`ShardReader` maps the first shards it reads, up to
:func:`mapped_shard_budget`, and reads a row of any further shard at the offset its header gives (open, seek,
read, close: about 20 us a row on this project's CPU machine, against about 8 us from a kept map). Either way a
row is a copy with the shard's dtype and row shape.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

#: mapped shards per process where the limit on open files is unknown (no ``resource`` module: Windows)
DEFAULT_MAPPED_SHARDS = 256


def mapped_shard_budget() -> int:
    """Shards a process may keep memory-mapped: a quarter of its soft limit on open files (the rest stays free for
    sockets, pipes, loader workers and the user's own files), at least 16."""
    try:
        import resource
    except ImportError:
        return DEFAULT_MAPPED_SHARDS
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(16, soft // 4)


class ShardReader:
    """Row ``i`` of an ``.npy`` shard ``[N, ...]`` as a fresh array ``[...]``: memory-mapped for the first
    ``max_mapped`` shards read (default :func:`mapped_shard_budget`, read when the first shard is), read at its
    byte offset for every later one. Pickles without its maps (each loader worker opens its own)."""

    def __init__(self, max_mapped: int | None = None) -> None:
        self.max_mapped = max_mapped
        self._maps: dict[str, np.ndarray] = {}
        self._layouts: dict[str, tuple[int, np.dtype, tuple[int, ...], int]] = {}  # offset, dtype, row shape, rows

    def row(self, path: str | os.PathLike, index: int) -> np.ndarray:
        path = os.fspath(path)
        mapped = self._maps.get(path)
        if mapped is None:
            if self.max_mapped is None:
                self.max_mapped = mapped_shard_budget()
            if len(self._maps) < self.max_mapped:
                mapped = self._maps[path] = np.load(path, mmap_mode="r")
        if mapped is not None:
            return np.array(mapped[index])
        offset, dtype, shape, rows = self._layout(path)
        if not -rows <= index < rows:
            raise IndexError(f"row {index} of {path}, which holds {rows}")
        count = int(np.prod(shape, dtype=np.int64))
        with open(path, "rb") as handle:
            handle.seek(offset + (index % rows) * count * dtype.itemsize)
            values = np.fromfile(handle, dtype=dtype, count=count)
        if values.size != count:
            raise OSError(f"{path} ends inside row {index} (truncated since it was checked?)")
        return values.reshape(shape)

    def _layout(self, path: str) -> tuple[int, np.dtype, tuple[int, ...], int]:
        layout = self._layouts.get(path)
        if layout is None:
            mapped = np.load(path, mmap_mode="r")  # numpy parses the header; the map is closed when dropped
            if not mapped.flags.c_contiguous:
                raise ValueError(f"{path} is stored in Fortran order; shards are written C-contiguous")
            layout = (int(mapped.offset), mapped.dtype, tuple(mapped.shape[1:]), int(mapped.shape[0]))
            del mapped
            self._layouts[path] = layout
        return layout

    def open_maps(self) -> int:
        """Shards this reader holds mapped (one open file each)."""
        return len(self._maps)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}
