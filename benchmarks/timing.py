"""Wall-clock timing shared by the speed benchmarks (``python benchmarks/<name>.py`` puts this folder on the path)."""

from __future__ import annotations

import time
from collections.abc import Callable


def seconds_per_call(function: Callable[[], object], repeats: int, runs: int = 5) -> float:
    """Median seconds per call of ``function()`` over ``runs`` runs of ``repeats`` calls, after one warm-up call."""
    function()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        for _ in range(repeats):
            function()
        times.append((time.perf_counter() - started) / repeats)
    return sorted(times)[runs // 2]
