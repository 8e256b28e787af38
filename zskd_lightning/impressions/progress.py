"""Progress of an offline synthesis, as a person watching it wants it.

Global rank 0 shows a bar while the Trainer has a progress bar (tqdm, which Lightning's own bar uses), else
prints a line at most every ``log_every_seconds``; after each of its chunks it logs the chunk's mean loss and
speed to the Trainer's logger (``synthesis/loss``, ``synthesis/impressions_per_second``,
``synthesis/impression_iterations_per_second``). Other ranks stay silent: rank 0 counts each of its chunks
``world_size`` times, as if every rank kept its pace (exact when ranks run alike; with ``stop_tolerance`` chunks
take unequal times, so the count is an estimate until the end).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from tqdm import tqdm


class SynthesisProgress:
    """Context manager around a synthesis of ``total`` impressions (all ranks) of ``iterations`` steps each."""

    def __init__(self, trainer: L.Trainer, total: int, iterations: int, log_every_seconds: float = 10.0) -> None:
        self.trainer, self.total, self.iterations = trainer, total, iterations
        self.log_every_seconds = log_every_seconds
        self.rank_zero = trainer.is_global_zero
        self.done = 0
        self.chunks = 0
        self.bar: tqdm | None = None
        self._last_line = time.perf_counter()
        self._started = time.perf_counter()

    def __enter__(self) -> SynthesisProgress:
        if self.rank_zero and self.trainer.progress_bar_callback is not None:
            self.bar = tqdm(total=self.total, desc="Synthesizing impressions", unit="img", file=sys.stderr,
                            dynamic_ncols=True, leave=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def iteration_callback(self, chunk: int) -> Callable[[int, float], None]:
        """``progress(iteration, mean_loss)`` for the inversion loop of ``chunk``."""

        def progress(iteration: int, loss: float) -> None:
            if self.bar is not None:
                self.bar.set_postfix(chunk=chunk, it=f"{iteration}/{self.iterations}", loss=f"{loss:.4f}",
                                     refresh=False)
                self.bar.refresh()
            elif self.rank_zero and time.perf_counter() - self._last_line >= self.log_every_seconds:
                self._last_line = time.perf_counter()
                rank_zero_info(f"synthesis: {self.done}/{self.total} impressions, chunk {chunk} at iteration "
                               f"{iteration}/{self.iterations}, loss {loss:.4f}")

        return progress

    def chunk_done(self, count: int, loss: float, steps: int, seconds: float) -> None:
        """After one of this rank's chunks: ``count`` impressions, mean final ``loss``, ``steps`` in ``seconds``."""
        if not self.rank_zero:
            return
        advance = min(self.total - self.done, count * self.trainer.world_size)
        self.done += advance
        self.chunks += 1
        if self.bar is not None:
            self.bar.update(advance)
        logger = self.trainer.logger
        if logger is not None and seconds > 0:
            logger.log_metrics({"synthesis/loss": loss, "synthesis/impressions_per_second": count / seconds,
                                "synthesis/impression_iterations_per_second": steps / seconds}, step=self.chunks)
