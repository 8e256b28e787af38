"""The synthesis callback: fills an :class:`~zskd_lightning.ImpressionDataModule`'s cache on every rank.

Rank semantics (``W`` = world size, over all nodes): global rank 0 checks the cache folder and broadcasts the
list of unfinished chunks; global rank ``r`` synthesizes the ``r``-th, ``(r + W)``-th, ... of them; every
rank writes its own chunk shards; after a barrier, global rank 0 verifies all chunks and writes the manifest;
after another barrier every rank memory-maps the whole cache. A chunk's content depends only on
``(seed, chunk index)``, so the cache does not depend on ``W``.

Ranks that finish early wait at the barrier for the others: the work is balanced to within one chunk, but a
synthesis far longer than the process-group timeout (30 min by default) should raise it, e.g.
``strategy: {class_path: lightning.pytorch.strategies.DDPStrategy, init_args: {timeout: "2:00:00"}}``.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from tqdm import tqdm

from zskd_lightning.errors import ZSKDError
from zskd_lightning.synthesis.base import ChunkRandomness
from zskd_lightning.synthesis.cache import ImpressionCache


class ImpressionSynthesis(Callback):
    """Synthesize the datamodule's missing impressions at ``on_fit_start`` (model on device, before any
    dataloader is built), under the Trainer's precision. ``zskd fit``/``zskd synthesize`` add it automatically.

    Args:
        grid_filename: a PNG of impressions per class written by rank 0 to the run's log folder (``None``: off).
    """

    def __init__(self, grid_filename: str | None = "impressions.png") -> None:
        self.grid_filename = grid_filename

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from zskd_lightning.impressions import ImpressionDataModule

        datamodule = trainer.datamodule
        if not isinstance(datamodule, ImpressionDataModule):
            raise ZSKDError(
                f"ImpressionSynthesis needs an ImpressionDataModule as the Trainer's datamodule, got "
                f"{type(datamodule).__name__}"
            )
        cache = fill_cache(trainer, pl_module, datamodule)
        folder = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank asks
        if trainer.is_global_zero and self.grid_filename:
            from zskd_lightning.visualize import save_impression_grid

            path = save_impression_grid(cache, os.path.join(folder, self.grid_filename), datamodule.input_range())
            rank_zero_info(f"Impression grid written to {path}")


def fill_cache(trainer: L.Trainer, pl_module: L.LightningModule, datamodule: Any) -> ImpressionCache:
    """Make every missing chunk of ``datamodule``'s cache across all ranks; return the (complete) cache."""
    strategy = trainer.strategy
    started = time.perf_counter()
    teacher = datamodule.resolve_teacher(pl_module)
    cache = datamodule.build_cache(teacher)

    plan: dict[str, Any] | None = None
    if trainer.is_global_zero:
        try:
            if cache.is_complete():
                plan = {"missing": [], "complete": True}
            else:
                cache.prepare(overwrite=datamodule.overwrite_cache)
                plan = {"missing": cache.missing_chunks(), "complete": False}
        except ZSKDError as err:  # every rank must learn of it, or the others hang at the next collective
            plan = {"error": str(err)}
    plan = strategy.broadcast(plan, src=0)
    if "error" in plan:
        raise ZSKDError(plan["error"])
    if plan["complete"]:
        rank_zero_info(f"Reusing the complete impression cache at {cache.directory} ({cache.count} impressions)")
        datamodule.use_cache(cache)
        return cache

    missing = plan["missing"]
    mine = missing[trainer.global_rank :: trainer.world_size]
    todo = sum(len(range(*cache.chunk_range(c))) for c in missing)
    synthesizer = datamodule.synthesizer
    synthesizer.setup(teacher)
    num_classes = teacher.num_classes
    device = pl_module.device
    input_range = datamodule.input_range()
    show = trainer.is_global_zero and trainer.progress_bar_callback is not None
    bar = tqdm(total=todo, desc="Synthesizing impressions", unit="img", disable=not show, file=sys.stderr, dynamic_ncols=True)
    rank_zero_info(
        f"Synthesizing {todo} of {cache.count} impressions ({len(missing)} chunks) on {trainer.world_size} "
        f"process(es) into {cache.directory}"
    )
    try:
        for chunk in mine:
            start, stop = cache.chunk_range(chunk)
            chunk_started = time.perf_counter()

            def progress(iteration: int, loss: float) -> None:
                bar.set_postfix(chunk=chunk, it=f"{iteration}/{synthesizer.iterations}", loss=f"{loss:.4f}", refresh=False)
                bar.refresh()

            inputs, targets, labels, loss = synthesizer.synthesize(
                teacher,
                indices=torch.arange(start, stop),
                input_shape=datamodule.input_shape,
                rng=ChunkRandomness.for_chunk(datamodule.seed, chunk),
                num_classes=num_classes,
                input_range=input_range,
                device=device,
                autocast=trainer.precision_plugin.forward_context,
                progress=progress if show else None,
            )
            cache.write_chunk(
                chunk, inputs, targets, labels, loss, time.perf_counter() - chunk_started, synthesizer.last_steps
            )
            # Rank 0 cannot see the others' progress; they advance in lockstep to within one chunk.
            bar.update(min(todo - bar.n, (stop - start) * trainer.world_size))
    finally:
        bar.close()

    strategy.barrier("zskd-impressions-synthesized")
    error = None
    if trainer.is_global_zero:
        try:
            resumed = sorted(set(range(cache.num_chunks)) - set(missing))
            manifest = cache.write_manifest(wall_seconds=time.perf_counter() - started, resumed_chunks=resumed)
            rank_zero_info(
                f"Impression cache complete: {cache.count} impressions in {manifest['wall_seconds']:.1f} s wall "
                f"({manifest['synthesis_seconds_total']:.1f} s of synthesis summed over chunks, "
                f"{manifest['impression_iterations_per_second'] or 0:.0f} impression-iterations/s per process)"
            )
        except ZSKDError as err:
            error = str(err)
    error = strategy.broadcast(error, src=0)
    if error:
        raise ZSKDError(error)
    datamodule.use_cache(cache)
    return cache
