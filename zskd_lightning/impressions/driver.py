"""The offline driver: fills an impression cache before distillation, on every rank of the Trainer.

Rank semantics (``W`` = world size, over all nodes): global rank 0 checks the cache folder and broadcasts the
list of unfinished chunks; global rank ``r`` synthesizes the ``r``-th, ``(r + W)``-th, ... of them; every
rank writes its own chunk shards; after a barrier (where an error on any rank reaches every rank: the failing
rank raises it, the others a :class:`~zskd_lightning.errors.RankSharedError` naming it), global rank 0 verifies
all chunks and writes the manifest; then every rank checks that it sees that manifest (``cache_dir`` must be a
folder every node shares) and reads the chunks, memory-mapped, as its loaders need them. A complete cache is
reused as it is (rank 0 verifies its checksums, without taking its lock: runs may share one). A chunk's content
depends only on ``(seed, chunk index)``, so the cache does not depend on ``W``.

Ranks that finish early wait at the barrier for the others: the work is balanced to within one chunk, but a
synthesis far longer than the process-group timeout (30 min by default) should raise it, e.g.
``strategy: {class_path: lightning.pytorch.strategies.DDPStrategy, init_args: {timeout: "2:00:00"}}``.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from zskd_lightning.checks import check_trainer_precision
from zskd_lightning.errors import InvalidArgument, RankSharedError, ZSKDError, described, first_line
from zskd_lightning.impressions.cache import ImpressionCache
from zskd_lightning.impressions.pictures import impression_grid
from zskd_lightning.impressions.progress import SynthesisProgress
from zskd_lightning.pictures import publish_picture
from zskd_lightning.pixels import InputSpec
from zskd_lightning.ranks import every_rank
from zskd_lightning.synthesis import Chunk, Synthesizer, SynthesisContext
from zskd_lightning.teacher import as_frozen_teacher


@dataclass
class ImpressionPlan:
    """What to synthesize and where: everything of an impression cache but the teacher.

    ``num_train + num_val`` impressions, ``chunk_size`` per chunk, chunk ``c``'s randomness from ``(seed, c)``.
    """

    synthesizer: Synthesizer
    input_spec: InputSpec
    cache_dir: str
    num_train: int
    num_val: int = 0
    chunk_size: int = 256
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.synthesizer, Synthesizer):
            raise InvalidArgument(
                f"an impression cache is made by a per-input inversion (a Synthesizer, e.g. ZSKDSynthesizer), got "
                f"{type(self.synthesizer).__name__}: a generator synthesizes during distillation, in an online "
                "method (OnlineDataModule)"
            )
        if self.synthesizer.reads_student:
            raise InvalidArgument(
                f"{type(self.synthesizer).__name__} has a part that reads the student, whose weights change as it "
                "trains, and an impression cache is made once, before training: use that part in an online method "
                "(OnlineDataModule)"
            )

    def cache_for(self, teacher: nn.Module, trainer_precision: str = "32-true") -> ImpressionCache:
        """The cache this plan and ``teacher`` define (nothing is read or written yet). A synthesizer without a
        ``precision`` of its own runs under the Trainer's (``trainer_precision``): a mixed one is then part of the
        cache's identity (``"autocast"``; absent for float32, as in caches made before it was recorded)."""
        frozen = as_frozen_teacher(teacher)
        autocast = trainer_precision if self.synthesizer.precision is None and trainer_precision != "32-true" else None
        spec = {
            "method": self.synthesizer.identity(),
            "teacher_fingerprint": frozen.fingerprint(),
            "num_classes": frozen.count_classes(self.input_spec.shape),
            "input_spec": self.input_spec.describe(),
            "dtype": "float32",
            "arrays": {"inputs": "impressions", "targets": "the method's targets", "labels": "class labels"},
            "num_impressions": self.num_train + self.num_val,
            "num_train_impressions": self.num_train,
            "chunk_size": self.chunk_size,
            "seed": self.seed,
            **({"autocast": autocast} if autocast else {}),
        }
        return ImpressionCache(self.cache_dir, spec)


class ImpressionSynthesis(Callback):
    """Synthesize the datamodule's missing impressions at ``on_fit_start`` (model on device, before any
    dataloader is built), from the LightningModule's ``teacher``, under the Trainer's precision.

    An :class:`~zskd_lightning.ImpressionDataModule` asks for this callback itself (``DistillationModule``
    returns it from ``configure_callbacks``), so ``zskd fit`` and a plain ``Trainer`` need not add it; one
    given to the Trainer by hand takes precedence (e.g. to change ``grid_filename``).

    Args:
        grid_filename: a PNG of impressions per class written by rank 0 to the run's log folder (``None``: off).
        log_every_seconds: without a progress bar, rank 0 prints a progress line at most this often.
        num_threads: torch CPU threads of each process while it synthesizes (restored afterwards). ``None``: as
            set (Lightning's DDP gives each of P processes ``cores // P`` unless ``OMP_NUM_THREADS`` is set).
            Processes that together ask for more threads than there are cores slow each other down many times
            over (two 2-thread runs on 2 cores: ~9x each).
    """

    def __init__(self, grid_filename: str | None = "impressions.png", log_every_seconds: float = 10.0,
                 num_threads: int | None = None) -> None:
        if num_threads is not None and num_threads < 1:
            raise InvalidArgument(f"num_threads must be >= 1, got {num_threads}")
        self.grid_filename = grid_filename
        self.log_every_seconds = log_every_seconds
        self.num_threads = num_threads
        self._filled = False  # this fit's impressions are made (set back at each fit's setup)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """``fit`` checks the Trainer's precision before any work; ``validate`` serves the held-out impressions of
        the complete cache on disk (nothing is synthesized), or nothing when the data validated is not an
        ImpressionDataModule (e.g. real images, on the Trainer of a finished fit)."""
        if stage == "fit":
            check_trainer_precision(trainer.precision)
            self._filled = False
            register = getattr(trainer.datamodule, "filled_by", None)  # an ImpressionDataModule's
            if register is not None:  # a tuner empties the Trainer's callbacks while it runs: the data keeps us
                register(self)
        if stage != "validate" or _impression_plan(trainer) is None:
            return
        plan, teacher = _plan_and_teacher(trainer, pl_module)
        if plan.num_val == 0:
            return
        failure = None
        try:  # the cache's identity may read files (a Lopes record) that one node lacks
            cache = plan.cache_for(teacher, trainer.precision)
            if not cache.is_complete(verify=trainer.is_global_zero):  # rank 0 checksums; each rank must see it
                failure = ZSKDError(f"validate reads the impressions of a complete cache, and {cache.directory} is "
                                    f"not one ({_why_incomplete(cache)}): run `zskd fit` or `zskd synthesize` with "
                                    "this config first")
        except Exception as err:
            failure = err
        _raise_naming_failing_rank(trainer, failure)
        trainer.datamodule.use_cache(cache)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._filled:  # an earlier callback's on_fit_start (a tuner's) may have asked for the data already
            self.fill(trainer, pl_module)

    def fill(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Make the fit's impressions (every rank: a collective) and hand the complete cache to the datamodule;
        once a fit. :meth:`on_fit_start` calls it, or the datamodule when a callback that runs before this one
        (Lightning puts its ``BatchSizeFinder`` and ``LearningRateFinder`` first) asks for training data."""
        self._filled = True
        plan, teacher = _plan_and_teacher(trainer, pl_module)
        datamodule = trainer.datamodule
        threads = torch.get_num_threads()
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        try:
            cache = fill_cache(trainer, plan, teacher, log_every_seconds=self.log_every_seconds)
        finally:
            torch.set_num_threads(threads)
        datamodule.use_cache(cache)
        folder = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank asks
        if trainer.is_global_zero and self.grid_filename:
            path = publish_picture(lambda: impression_grid(cache, plan.input_spec.valid_range()),
                                   os.path.join(folder, self.grid_filename), trainer.loggers, "impressions")
            if path is not None:
                rank_zero_info(f"Impression grid written to {path}")


def _why_incomplete(cache: ImpressionCache) -> str:
    """Why ``cache`` is not complete for its spec and budget, in a few words."""
    mismatch = cache.spec_mismatch()
    if mismatch:
        return mismatch.split(";")[0]  # what differs; the remedies after it are a synthesis run's
    manifest = cache.stored_manifest()
    if manifest is None:
        return "its synthesis has not finished"
    shards = len(manifest.get("shards", ()))
    if shards < cache.num_chunks:
        return f"it holds {shards} chunk(s) of {cache.chunk_size}; this budget needs {cache.num_chunks}"
    return f"chunk(s) {cache.missing_chunks()[:5]} are missing or fail their checksums"


def _impression_plan(trainer: L.Trainer) -> ImpressionPlan | None:
    """The Trainer's datamodule's impression plan; ``None`` when it is not an ImpressionDataModule."""
    plan = getattr(trainer.datamodule, "impression_plan", None)
    return plan if isinstance(plan, ImpressionPlan) else None


def _plan_and_teacher(trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[ImpressionPlan, nn.Module]:
    plan = _impression_plan(trainer)
    if plan is None:
        raise ZSKDError(
            f"ImpressionSynthesis needs an ImpressionDataModule as the Trainer's datamodule, got "
            f"{type(trainer.datamodule).__name__}"
        )
    teacher = getattr(pl_module, "teacher", None)
    if not isinstance(teacher, nn.Module):
        raise ZSKDError(f"ImpressionSynthesis synthesizes from the LightningModule's `teacher`; "
                        f"{type(pl_module).__name__} has none")
    return plan, teacher


def fill_cache(trainer: L.Trainer, plan: ImpressionPlan, teacher: nn.Module,
               log_every_seconds: float = 10.0) -> ImpressionCache:
    """Make every missing chunk of ``plan``'s cache from ``teacher`` across all ranks, under the Trainer's
    precision; return the complete cache."""
    started = time.perf_counter()
    teacher = as_frozen_teacher(teacher)
    failure = None
    try:  # the cache's identity may read files (a Lopes record) that one node lacks, or run out of device memory
        cache = plan.cache_for(teacher, trainer.precision)
    except Exception as err:
        failure = err
    _raise_naming_failing_rank(trainer, failure)
    with contextlib.ExitStack() as held:  # rank 0 holds the cache's lock until the manifest is written
        return _fill_locked(trainer, plan, teacher, cache, held, started, log_every_seconds)


def _fill_locked(trainer: L.Trainer, plan: ImpressionPlan, teacher: nn.Module,
                 cache: ImpressionCache, held: contextlib.ExitStack, started: float,
                 log_every_seconds: float) -> ImpressionCache:
    strategy = trainer.strategy
    decision: dict[str, Any] | None = None
    failure: Exception | None = None
    if trainer.is_global_zero:
        try:
            # a complete cache is only read: reused without its lock, so runs sharing one (a sweep of students, a
            # read-only folder) need not wait for each other; a cache with chunks to make is filled under the lock
            problems: dict[int, str] = {}
            complete = cache.is_complete()
            if not complete:
                cache.refuse_foreign_folder(plan.overwrite)  # before the lock, whose file would be left there
                held.enter_context(cache.locked())
                kept = cache.upgrade_format_2()
                if kept is not None:
                    rank_zero_info(f"Impression cache {cache.directory} upgraded from format 2: {kept} full chunk(s) "
                                   "kept")
                cache.prepare(overwrite=plan.overwrite)
                problems = cache.chunk_problems()  # the one checksum pass under the lock
                # another run may have finished it while we checked: every chunk sound and its manifest written
                complete = not problems and cache.read_manifest() is not None
            if complete:
                decision = {"missing": [], "complete": True}
            else:
                for chunk, why in problems.items():
                    if why != "not made yet":
                        rank_zero_warn(f"impression cache {cache.directory}: chunk {chunk} is made again: {why}")
                decision = {"missing": sorted(problems), "complete": False}
        except ZSKDError as err:  # every rank must learn of it, or the others hang at the next collective
            decision = {"error": str(err)}
        except OSError as err:  # read-only, full, not a folder, ...
            decision = {"error": f"cannot use the impression cache {cache.directory}: {err.strerror or err}"}
        except Exception as err:  # a bug: rank 0 raises it as it is, the others learn of it
            failure, decision = err, {"error": described(err)}
    decision = strategy.broadcast(decision, src=0)
    if failure is not None:
        raise failure
    if "error" in decision:
        raise RankSharedError(decision["error"])
    if decision["complete"]:
        rank_zero_info(f"Reusing the complete impression cache at {cache.directory} ({cache.count} impressions)")
        _check_every_rank_sees(trainer, cache)
        return cache

    missing = decision["missing"]
    mine = missing[trainer.global_rank :: trainer.world_size]
    todo = sum(len(range(*cache.chunk_range(c))) for c in missing)
    synthesizer = plan.synthesizer
    context = SynthesisContext(
        teacher=teacher,
        input_spec=plan.input_spec,
        num_classes=teacher.count_classes(plan.input_spec.shape),
        device=teacher_device(teacher),
        autocast=trainer.precision_plugin.forward_context,
        seed=plan.seed,
    )
    try:  # setup too: it may read files (a Lopes record) that one node lacks
        synthesizer.setup(context)
        rank_zero_info(
            f"Synthesizing {todo} impressions ({len(missing)} chunks of {cache.chunk_size}) for a budget of "
            f"{cache.count} ({plan.num_train} training + {plan.num_val} validation) on {trainer.world_size} "
            f"process(es) into {cache.directory}"
        )
        _synthesize_chunks(synthesizer, context, plan, cache, mine, trainer, todo, log_every_seconds)
    except Exception as err:  # every rank must learn of it, or the others wait at the next collective for ever
        failure = err
    _raise_naming_failing_rank(trainer, failure)  # also the barrier after synthesis
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
        except OSError as err:  # full disk, read-only folder: the other ranks wait at the broadcast below
            error = f"cannot write the manifest of the impression cache {cache.directory}: {err.strerror or err}"
    error = strategy.broadcast(error, src=0)
    if error:
        raise RankSharedError(error)
    _check_every_rank_sees(trainer, cache)
    return cache


def _check_every_rank_sees(trainer: L.Trainer, cache: ImpressionCache) -> None:
    """A collective: every rank reads the manifest global rank 0 found or wrote (one small file, no checksums),
    so a node whose ``cache_dir`` is its own disk (empty, or another cache at that path) fails here in one line
    instead of training on what its folder holds."""
    if trainer.world_size == 1:
        return
    failure = None
    if cache.read_manifest() is None:
        failure = ZSKDError(f"rank {trainer.global_rank} on {platform.node()} does not see the complete impression "
                            f"cache rank 0 holds at {cache.directory}: cache_dir must be a folder every node shares")
    shared = _first_failure(trainer, failure)
    if shared is not None:
        raise RankSharedError(shared)


def _synthesize_chunks(synthesizer: Synthesizer, context: SynthesisContext, plan: ImpressionPlan,
                       cache: ImpressionCache, chunks: list[int], trainer: L.Trainer, todo: int,
                       log_every_seconds: float) -> None:
    """Synthesize and write ``chunks`` (this rank's share), reporting progress (rank 0 prints it)."""
    with SynthesisProgress(trainer, total=todo, iterations=synthesizer.iterations,
                           log_every_seconds=log_every_seconds) as progress:
        for chunk_index in chunks:
            start, stop = cache.chunk_range(chunk_index)
            chunk_started = time.perf_counter()
            result = synthesizer.invert(context, Chunk.of(plan.seed, chunk_index, start, stop),
                                        progress=progress.iteration_callback(chunk_index))
            seconds, mean_loss = time.perf_counter() - chunk_started, float(result.loss.mean())
            try:
                cache.write_chunk(chunk_index, result.inputs, result.targets, result.labels, mean_loss, seconds,
                                  result.steps)
            except OSError as err:  # full disk, read-only folder: the finished chunks stay sound
                raise ZSKDError(f"cannot write chunk {chunk_index} of the impression cache {cache.directory}: "
                                f"{err.strerror or err}") from err
            progress.chunk_done(stop - start, mean_loss, result.steps, seconds)


def _raise_naming_failing_rank(trainer: L.Trainer, failure: Exception | None) -> None:
    """A collective (every rank calls it at the same point; also a barrier): the failing rank raises its own
    ``failure`` (with its traceback), every other rank a :class:`RankSharedError` naming the lowest failing rank
    and its error (:func:`_first_failure`; unlike :func:`zskd_lightning.ranks.raise_together`, whose other ranks
    only say that one failed), so that no rank is left waiting at the next collective for one that stopped."""
    shared = _first_failure(trainer, failure)
    if failure is not None:
        raise failure
    if shared is not None:
        raise RankSharedError(shared)


def _first_failure(trainer: L.Trainer, failure: Exception | None) -> str | None:
    """A collective (every rank calls it; it is also a barrier): ``None`` when no rank failed, else one line
    naming the lowest failing rank and its error, the same on every rank."""
    if trainer.strategy.reduce_boolean_decision(failure is None, all=True):
        return None
    if failure is None:
        message = None
    elif isinstance(failure, ZSKDError):
        message = first_line(failure)
    else:  # a bug or a device error: say what it was
        message = described(failure)
    messages = every_rank(message)
    if len(messages) == 1:
        return message
    rank = next(r for r, m in enumerate(messages) if m is not None)
    return f"impression synthesis failed on rank {rank}: {messages[rank]}"


def teacher_device(teacher: nn.Module):
    """The device of the teacher's first parameter or buffer (CPU for a module with neither)."""
    for tensor in (*teacher.parameters(), *teacher.buffers()):
        return tensor.device
    return torch.device("cpu")
