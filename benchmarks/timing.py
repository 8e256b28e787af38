"""Wall-clock timing shared by the speed benchmarks (``python benchmarks/<name>.py`` puts this folder on the path)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping


def seconds_per_call(calls: Mapping[str, Callable[[], object]], repeats: int, runs: int = 5) -> dict[str, float]:
    """Median seconds per call of each ``calls[name]()`` over ``runs`` runs of ``repeats`` calls, after one
    warm-up call of each. The variants are interleaved, each run timing every variant in turn, so that a slow
    spell of a shared machine falls on all of them rather than on one variant's runs."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(runs):
        for name, call in calls.items():
            started = time.perf_counter()
            for _ in range(repeats):
                call()
            times[name].append((time.perf_counter() - started) / repeats)
    return {name: sorted(values)[runs // 2] for name, values in times.items()}
