"""The impression cache: manifest, reuse, mismatch refusal, overwrite, corruption, resume after a crash or a
SIGKILL, and ``zskd synthesize`` feeding a later ``fit`` (CPU; one subprocess for the kill, one for the CLI).

Most runs use the standard tiny cache of ``helpers.tiny`` (teacher ``make_net(0)``, 64 impressions in 8 chunks
of 8, 5 iterations) through the real path: ``Trainer.fit`` with the ImpressionSynthesis callback.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import tiny
from helpers.tiny import one_torch_thread  # noqa: F401  (module-wide autouse fixture)

import zskd_lightning
from zskd_lightning import (
    DistillationModule,
    ImpressionCache,
    ImpressionDataModule,
    ImpressionDataset,
    Synthesizer,
    ZSKDError,
    ZSKDSynthesizer,
)
from zskd_lightning.data import DigitsDataModule
from zskd_lightning.errors import InvalidArgument, RankSharedError
from zskd_lightning.files import partial_path
from zskd_lightning.impressions import cache as cache_module
from zskd_lightning.impressions.shards import ShardReader
from zskd_lightning.teacher import as_frozen_teacher

NUM_CHUNKS = 8


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted synthesis of the standard tiny cache (never modified by the tests)."""
    cache_dir = tmp_path_factory.mktemp("reference") / "cache"
    tiny.run_synthesis(cache_dir)
    return cache_dir


@pytest.fixture
def count_synthesis(monkeypatch) -> list[int]:
    """Patch ``Synthesizer.invert`` to record the first global index of every chunk it makes."""
    made: list[int] = []
    original = Synthesizer.invert

    def counting(self, context, chunk, *args, **kwargs):
        made.append(int(chunk.indices[0]))
        return original(self, context, chunk, *args, **kwargs)

    monkeypatch.setattr(Synthesizer, "invert", counting)
    return made


@pytest.fixture
def forbid_synthesis(monkeypatch) -> None:
    def refuse(self, *args, **kwargs):
        raise AssertionError("no impression should be synthesized: the cache is complete")

    monkeypatch.setattr(Synthesizer, "invert", refuse)


def copy_cache(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def mtimes(cache_dir: Path) -> dict[str, int]:
    """Modification times of the cache's files (its ``.lock`` is rewritten by every run that takes it)."""
    return {p.name: p.stat().st_mtime_ns for p in cache_dir.iterdir() if p.name != ".lock"}


def flip_byte(path: Path, offset: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def assert_same_cache(cache_dir: Path, reference_dir: Path) -> None:
    """Same shards byte for byte, same shard list in the manifest."""
    assert tiny.shard_digests(cache_dir) == tiny.shard_digests(reference_dir)
    assert tiny.manifest_shards(cache_dir) == tiny.manifest_shards(reference_dir)
    assert json.loads((cache_dir / "spec.json").read_text()) == json.loads((reference_dir / "spec.json").read_text())


# ------------------------------------------------------------------------------------------- full synthesis
def test_full_synthesis_writes_spec_manifest_and_shards(tmp_path):
    teacher = tiny.make_net(0)
    trainer, datamodule = tiny.run_synthesis(tmp_path / "cache", fit=True, teacher=teacher, num_impressions=20)
    cache_dir = tmp_path / "cache"
    names = {p.name for p in cache_dir.iterdir()}
    chunks = {f"chunk-{c:06d}.{kind}" for c in range(3) for kind in ("inputs.npy", "json", "labels.npy", "targets.npy")}
    assert {"spec.json", "manifest.json"} <= names and {n for n in names if n.startswith("chunk-")} == chunks
    assert not [n for n in names if n.endswith(".tmp")]
    assert (tmp_path / "impressions.png").is_file()

    spec = json.loads((cache_dir / "spec.json").read_text())
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert {k: manifest[k] for k in spec} == spec
    assert "num_impressions" not in spec  # the budget is no part of the identity
    assert manifest["format_version"] == cache_module.FORMAT_VERSION == 3
    assert manifest["method"] == json.loads(json.dumps(datamodule.synthesizer.identity()))
    assert manifest["method"]["name"] == "zskd"
    assert manifest["method"]["args"]["iterations"] == 5 and manifest["method"]["args"]["lr"] == 0.05
    assert manifest["teacher_fingerprint"] == as_frozen_teacher(teacher).fingerprint()
    assert manifest["input_spec"]["shape"] == [1, 8, 8] and manifest["dtype"] == "float32"
    assert manifest["num_impressions"] == 20 and manifest["chunk_size"] == 8 and manifest["seed"] == 0
    assert manifest["num_classes"] == 10
    assert manifest["input_spec"]["mean"] == list(tiny.DIGITS_MEAN)
    assert manifest["input_spec"]["std"] == list(tiny.DIGITS_STD)
    assert set(manifest["versions"]) >= {"zskd_lightning", "torch", "lightning", "numpy", "python"}
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["versions"]["zskd_lightning"] == zskd_lightning.__version__
    assert manifest["wall_seconds"] > 0
    assert [s["chunk"] for s in manifest["shards"]] == [0, 1, 2]
    assert [s["count"] for s in manifest["shards"]] == [8, 8, 8]  # every chunk is full; 20 are served
    for shard in manifest["shards"]:
        for kind in tiny.ARRAYS:
            path = cache_dir / f"chunk-{shard['chunk']:06d}.{kind}.npy"
            assert shard["sha256"][kind] == tiny.sha256(path)

    inputs = np.concatenate([np.load(cache_dir / f"chunk-{c:06d}.inputs.npy") for c in range(3)])
    targets = np.concatenate([np.load(cache_dir / f"chunk-{c:06d}.targets.npy") for c in range(3)])
    labels = np.concatenate([np.load(cache_dir / f"chunk-{c:06d}.labels.npy") for c in range(3)])
    assert inputs.shape == (24, 1, 8, 8) and inputs.dtype == np.float32
    assert targets.shape == (24, 10) and targets.dtype == np.float32
    assert labels.dtype == np.int64 and np.array_equal(labels, np.arange(24) % 10)
    low, high = tiny.digits_input_range()
    assert ((inputs >= low.item()) & (inputs <= high.item())).all()

    # the datamodule serves exactly the cached impressions (and fit trained on them)
    dataset = datamodule.train_dataloader().dataset
    assert len(dataset) == 20
    x, y = dataset[13]
    assert np.array_equal(x.numpy(), inputs[13]) and np.array_equal(y.numpy(), targets[13])
    assert trainer.global_step > 0


def test_cache_class_directly(tmp_path):
    cache = ImpressionCache(tmp_path / "c", {"num_impressions": 10, "chunk_size": 4, "anything": [1, 2]})
    assert cache.num_chunks == 3 and cache.chunk_range(2) == (8, 12)  # full: a budget reads a prefix
    assert not cache.is_complete()
    cache.prepare()
    assert cache.missing_chunks() == [0, 1, 2]
    for chunk in range(3):
        start, stop = cache.chunk_range(chunk)
        n = stop - start
        cache.write_chunk(chunk, torch.full((n, 1, 2, 2), float(chunk)), torch.ones(n, 3) / 3,
                          torch.arange(start, stop), loss=0.5, seconds=0.01)
    assert cache.missing_chunks() == []
    with pytest.raises(ValueError, match=r"^chunk 0: inputs has 3 rows, expected \d+$"):  # wrong number of rows
        cache.write_chunk(0, torch.zeros(3, 1, 2, 2), torch.zeros(3, 3), torch.zeros(3), 0.0, 0.0)
    assert not cache.is_complete()  # no manifest yet
    manifest = cache.write_manifest(wall_seconds=1.0)
    assert cache.is_complete() and cache.read_manifest() == manifest
    assert np.concatenate(cache.load("labels")).tolist() == list(range(10))
    assert [a.shape[0] for a in cache.load("inputs", 4, 10)] == [4, 2]
    assert np.concatenate(cache.load("labels", 5, 10)).tolist() == [5, 6, 7, 8, 9]  # rows, not whole chunks
    assert np.concatenate(cache.load("labels", 5, 7)).tolist() == [5, 6]  # within one chunk
    # the same folder under another spec is refused, and is not "complete" for it
    other = ImpressionCache(tmp_path / "c", {"num_impressions": 10, "chunk_size": 4, "anything": [1, 3]})
    assert not other.is_complete()
    with pytest.raises(ZSKDError, match="anything"):
        other.prepare()
    # a write_manifest with a chunk missing is refused
    os.remove(cache.chunk_file(1, "record"))
    with pytest.raises(ZSKDError, match="lacks 1 finished chunk"):
        cache.write_manifest(wall_seconds=1.0)
    # chunks an earlier run finished were verified when this run started: only the others are checksummed again
    checked = []
    original = ImpressionCache.chunk_problem
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ImpressionCache, "chunk_problem", lambda self, c: checked.append(c) or original(self, c))
        with pytest.raises(ZSKDError, match="lacks 1 finished chunk"):
            cache.write_manifest(wall_seconds=1.0, resumed_chunks=[0, 2])
    assert checked == [1]


def _many_chunk_cache(folder: Path, chunks: int) -> ImpressionCache:
    """A complete cache of ``chunks`` chunks of 2 impressions ``[1, 2, 2]``, impression ``i`` filled with ``i``."""
    cache = ImpressionCache(folder, {"num_impressions": 2 * chunks, "chunk_size": 2})
    cache.prepare()
    for chunk in range(chunks):
        start, stop = cache.chunk_range(chunk)
        rows = torch.arange(start, stop, dtype=torch.float32)
        cache.write_chunk(chunk, rows.view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous(),
                          torch.stack([rows, -rows], dim=1), torch.arange(start, stop) % 3, loss=0.0, seconds=0.0)
    cache.write_manifest(wall_seconds=0.0)
    return cache


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts this process's open files in /proc")
def test_a_cache_of_many_chunks_is_read_within_the_limit_on_open_files(tmp_path):
    """A memory map holds a file open: a dataset that mapped every shard of a 1,000-chunk cache stopped with "Too
    many open files" under the common soft limit of 1,024. Under a soft limit 40 files above what is open, every
    row of a 60-chunk cache (120 shards) is read, right, and so is its picture."""
    import resource

    from zskd_lightning.impressions.pictures import impression_grid

    cache = _many_chunk_cache(tmp_path / "c", chunks=60)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    dataset = ImpressionDataset(cache, 0, cache.count)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 40, hard))
    try:
        rows = [dataset[i] for i in range(len(dataset))]
        grid = impression_grid(cache)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert [float(x[0, 0, 0]) for x, _ in rows] == list(range(120))
    assert all(x.shape == (1, 2, 2) and y.tolist() == [i, -i] for i, (x, y) in enumerate(rows))
    assert 0 < dataset.shards.open_maps() < 40 and grid.size[0] > 0
    reader = ShardReader(max_mapped=0)  # read at the offset only: the same rows
    assert np.array_equal(reader.row(cache.chunk_file(7, "targets"), 1), np.array([15.0, -15.0], np.float32))
    assert reader.open_maps() == 0 and reader.row(cache.chunk_file(7, "inputs"), -1).dtype == np.float32
    with pytest.raises(IndexError, match="row 2 of .*chunk-000007.inputs.npy, which holds 2"):
        reader.row(cache.chunk_file(7, "inputs"), 2)


def test_a_smaller_budget_that_repairs_a_chunk_keeps_the_larger_budgets_manifest(tmp_path):
    """A 2-chunk budget that makes chunk 0 again (damaged) rewrites the manifest: it kept only its own 2 shard
    records, so the 4-chunk cache looked unfinished (checksummed again under the lock; under DDP a rank could read
    the shrunk manifest between rank 0's check and its own and fail with "cache_dir must be a folder every node
    shares")."""
    large = _many_chunk_cache(tmp_path / "c", chunks=4)
    small = ImpressionCache(tmp_path / "c", {"num_impressions": 4, "chunk_size": 2})
    os.remove(small.chunk_file(0, "record"))
    assert small.missing_chunks() == [0]
    small.write_chunk(0, torch.zeros(2, 1, 2, 2), torch.zeros(2, 2), torch.zeros(2), loss=0.0, seconds=0.0)
    manifest = small.write_manifest(wall_seconds=0.0)
    assert len(manifest["shards"]) == 4 and manifest["num_impressions"] == 4
    assert large.read_manifest() is not None and large.is_complete()
    # the totals are this budget's: its 2 chunks
    assert manifest["synthesis_seconds_total"] == 0.0 and manifest["impression_iterations_total"] == 0


def test_a_setting_spelt_20_reuses_the_cache_made_with_20_point_0(tmp_path):
    """``temperature=20`` and ``20.0`` are one setting: the same cache, not one made again (its chunk records
    carry the digest of the folder's spelling); a manifest that is not a JSON object means "not complete"."""
    spec = {"num_impressions": 8, "chunk_size": 4, "method": {"name": "m", "temperature": 20.0, "balanced": True}}
    cache = ImpressionCache(tmp_path / "c", spec)
    cache.prepare()
    for chunk in range(2):
        cache.write_chunk(chunk, torch.zeros(4, 1, 2, 2), torch.ones(4, 3) / 3, torch.zeros(4), 0.5, 0.01)
    cache.write_manifest(wall_seconds=1.0)
    again = ImpressionCache(tmp_path / "c", {**spec, "method": {"name": "m", "temperature": 20, "balanced": 1}})
    assert again.cache_id == cache.cache_id and again.spec_mismatch() is None
    assert again.is_complete() and again.missing_chunks() == []
    (tmp_path / "c" / "manifest.json").write_text("[1, 2]")
    assert not again.is_complete()


# --------------------------------------------------------------------------------------------------- reuse
def test_second_run_reuses_the_cache(tmp_path, reference, forbid_synthesis):
    cache_dir = copy_cache(reference, tmp_path / "cache")
    before = mtimes(cache_dir)
    trainer, datamodule = tiny.run_synthesis(cache_dir, fit=True, teacher=tiny.make_net(0))  # a new, equal teacher
    assert mtimes(cache_dir) == before
    assert trainer.global_step > 0 and len(datamodule.train_dataloader().dataset) == 64
    assert_same_cache(cache_dir, reference)


def test_changed_teacher_is_refused(tmp_path, reference, forbid_synthesis):
    cache_dir = copy_cache(reference, tmp_path / "cache")
    teacher = tiny.make_net(0)
    with torch.no_grad():
        teacher.body[0].weight[0, 0, 0, 0] += 1e-3  # one weight
    with pytest.raises(ZSKDError, match="different teacher"):
        tiny.run_synthesis(cache_dir, teacher=teacher)
    assert_same_cache(cache_dir, reference)  # nothing was touched


@pytest.mark.parametrize(
    ("change", "key", "cached", "now"),
    [
        ({"iterations": 6}, "iterations", 5, 6),
        ({"lr": 0.01}, "lr", 0.05, 0.01),
        ({"seed": 1}, "seed", 0, 1),
        ({"chunk_size": 16}, "chunk_size", 8, 16),
    ],
    ids=["iterations", "lr", "seed", "chunk_size"],
)
def test_changed_setting_is_refused_naming_the_key(tmp_path, reference, forbid_synthesis, change, key, cached, now):
    """The error names the changed key with both values (a method argument as e.g. ``method.args.lr``)."""
    cache_dir = copy_cache(reference, tmp_path / "cache")
    with pytest.raises(ZSKDError) as error:
        tiny.run_synthesis(cache_dir, **change)
    message = str(error.value)
    assert "different teacher" not in message and "overwrite_cache" in message
    assert_same_cache(cache_dir, reference)  # nothing was touched
    pattern = rf"(^|[\s(.]){key}: cached {re.escape(repr(cached))} vs now {re.escape(repr(now))}\b"
    assert re.search(pattern, message), message


def test_a_cache_of_the_older_format_is_refused_in_one_line(tmp_path, reference, forbid_synthesis):
    """A format-1 cache (hand-written settings under ``synthesizer``) is never reused, even where it would match."""
    cache_dir = copy_cache(reference, tmp_path / "cache")
    for name in ("spec.json", "manifest.json"):
        record = json.loads((cache_dir / name).read_text())
        record["format_version"] = 1
        record["synthesizer"] = {"name": "zskd", "class": "zskd_lightning.synthesis.zskd.ZSKDSynthesizer"}
        del record["method"]
        (cache_dir / name).write_text(json.dumps(record))
    with pytest.raises(ZSKDError) as error:
        tiny.run_synthesis(cache_dir)
    message = str(error.value)
    assert "\n" not in message and "cache format 1" in message and "format 3" in message
    assert "overwrite_cache" in message and str(cache_dir) in message
    assert tiny.shard_digests(cache_dir) == tiny.shard_digests(reference)  # nothing was touched


def test_a_cache_of_another_method_is_refused_in_one_line(tmp_path, reference, forbid_synthesis):
    from zskd_lightning import ClassImpressionSynthesizer

    cache_dir = copy_cache(reference, tmp_path / "cache")
    with pytest.raises(ZSKDError) as error:
        tiny.run_synthesis(cache_dir, synthesizer=ClassImpressionSynthesizer(iterations=5, lr=0.05))
    message = str(error.value)
    assert "\n" not in message and "'zskd' impressions, not 'class_impressions'" in message
    assert_same_cache(cache_dir, reference)


def test_a_cache_made_in_float32_is_not_reused_under_a_mixed_trainer_precision(tmp_path, reference,
                                                                               forbid_synthesis):
    """A synthesizer without a precision of its own runs under the Trainer's: bf16 chunks must not join (or stand
    in for) float32 ones. Float32 caches keep the identity they had before the precision was recorded."""
    cache_dir = copy_cache(reference, tmp_path / "cache")
    with pytest.raises(ZSKDError) as error:
        tiny.run_synthesis(cache_dir, precision="bf16-mixed")
    assert "autocast: cached None vs now 'bf16-mixed'" in str(error.value)
    assert_same_cache(cache_dir, reference)
    own = ZSKDSynthesizer(iterations=5, lr=0.05, precision="32-true")  # its own arithmetic: the Trainer's is moot
    plan = tiny.make_datamodule(cache_dir, synthesizer=own).impression_plan
    assert "autocast" not in plan.cache_for(tiny.make_net(0), "bf16-mixed").spec


def test_a_method_that_reads_the_student_is_refused_for_a_cache_in_one_line(tmp_path):
    """Its impressions would depend on the student's weights when synthesis ran, which no cache records."""
    from zskd_lightning.synthesis import Disagreement

    synthesizer = ZSKDSynthesizer(iterations=5, regularizers=[Disagreement()])
    with pytest.raises(InvalidArgument, match=r"reads the student.*online method") as error:
        tiny.make_datamodule(tmp_path / "cache", synthesizer=synthesizer)
    assert "\n" not in str(error.value)


def test_a_generator_method_is_refused_for_a_cache_in_one_line(tmp_path):
    """From Python (YAML checks the type) a generator reached the run: the lock taken and spec.json written for
    a cache it could never fill, then an AttributeError on `iterations`."""
    from zskd_lightning import FastSynthesizer

    with pytest.raises(InvalidArgument, match=r"^an impression cache is made by a per-input inversion .* got "
                                              r"FastSynthesizer: a generator synthesizes during distillation"):
        tiny.make_datamodule(tmp_path / "cache", synthesizer=FastSynthesizer(adversarial=0))
    assert not (tmp_path / "cache").exists()


def test_a_manifest_that_cannot_be_written_is_a_one_line_error_shared_by_every_rank(tmp_path, monkeypatch):
    """Rank 0 writes the manifest after the others finished: its OSError (a full disk) must reach them through the
    broadcast that follows, not leave them waiting there; the finished chunks stay for the next run."""
    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ImpressionCache, "write_manifest", full_disk)
    # RankSharedError: decided on rank 0 and broadcast (raised before the broadcast it would be a plain ZSKDError)
    with pytest.raises(RankSharedError, match=r"cannot write the manifest of the impression cache .*No space left") as error:
        tiny.run_synthesis(tmp_path / "cache", num_impressions=16)
    assert "\n" not in str(error.value) and len(list((tmp_path / "cache").glob("chunk-*.json"))) == 2


def test_a_rank_on_a_node_without_rank_0s_folder_writes_its_chunks_into_its_own(tmp_path):
    """Nodes without a shared folder (README, multi-node synthesis): only global rank 0 prepares the folder, so a
    rank on another node makes it when it writes its first chunk; the chunks are merged into one folder later."""
    cache = tiny.make_datamodule(tmp_path / "node1" / "cache").impression_plan.cache_for(tiny.make_net(0))
    start, stop = cache.chunk_range(3)
    inputs = torch.zeros(stop - start, *tiny.INPUT_SHAPE)
    cache.write_chunk(3, inputs, torch.zeros(stop - start, 10), torch.zeros(stop - start, dtype=torch.long), 0.0, 1.0)
    assert sorted(p.name for p in (tmp_path / "node1" / "cache").glob("chunk-000003.*")) == [
        "chunk-000003.inputs.npy", "chunk-000003.json", "chunk-000003.labels.npy", "chunk-000003.targets.npy"]


def test_overwrite_cache_replaces_a_mismatching_cache(tmp_path, reference, count_synthesis):
    cache_dir = copy_cache(reference, tmp_path / "cache")
    tiny.run_synthesis(cache_dir, seed=1, num_impressions=24, overwrite_cache=True)
    assert count_synthesis == [0, 8, 16]
    spec = json.loads((cache_dir / "spec.json").read_text())
    assert spec["seed"] == 1 and "num_impressions" not in spec
    assert sorted(p.name for p in cache_dir.glob("chunk-*.json")) == [f"chunk-{c:06d}.json" for c in range(3)]
    assert not (cache_dir / "chunk-000003.inputs.npy").exists()  # the old cache's extra chunks are gone
    old = tiny.shard_digests(reference)
    new = tiny.shard_digests(cache_dir)
    assert all(new[name] != old[name] for name in new if "inputs" in name)
    assert ImpressionCache(cache_dir, {**spec, "num_impressions": 24}).is_complete()


# ------------------------------------------------------------------------------------------------ budgets
def test_a_larger_budget_adds_chunks_to_the_same_cache(tmp_path, reference, count_synthesis):
    """64 impressions cached; 80 asked: only chunks 8 and 9 are made, and the cache equals a fresh one of 80."""
    cache_dir = copy_cache(reference, tmp_path / "cache")
    tiny.run_synthesis(cache_dir, num_impressions=80)
    assert count_synthesis == [64, 72]
    grown, old = tiny.shard_digests(cache_dir), tiny.shard_digests(reference)
    assert {name: grown[name] for name in old} == old  # the cached chunks untouched
    count_synthesis.clear()
    tiny.run_synthesis(tmp_path / "fresh", num_impressions=80)
    assert tiny.shard_digests(tmp_path / "fresh") == grown
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["num_impressions"] == 80 and len(manifest["shards"]) == 10


def test_a_smaller_budget_reads_a_prefix_and_makes_nothing(tmp_path, reference, forbid_synthesis):
    cache_dir = copy_cache(reference, tmp_path / "cache")
    _, datamodule = tiny.run_synthesis(cache_dir, num_impressions=20, num_val_impressions=4)
    train, val = datamodule.train_dataloader().dataset, datamodule.val_dataloader()[0].dataset
    assert (len(train), len(val)) == (20, 4)
    first_chunks = np.concatenate([np.load(reference / f"chunk-{c:06d}.inputs.npy") for c in range(3)])
    assert np.array_equal(train[19][0].numpy(), first_chunks[19]) and np.array_equal(val[3][0].numpy(), first_chunks[23])
    assert_same_cache(cache_dir, reference)


def test_a_format_2_cache_is_upgraded_keeping_its_full_chunks(tmp_path, reference, count_synthesis):
    """A format-2 cache (budget in its identity, last chunk partial) of the same settings: its full chunks are
    kept, its partial one is made again, and the result is the format-3 cache."""
    cache_dir = copy_cache(reference, tmp_path / "cache")
    identity = json.loads((cache_dir / "spec.json").read_text())
    old_spec = {**identity, "format_version": 2, "num_impressions": 60, "num_train_impressions": 60}
    old_id = hashlib.sha256(json.dumps(old_spec, sort_keys=True).encode()).hexdigest()[:20]
    (cache_dir / "spec.json").write_text(json.dumps(old_spec))
    (cache_dir / "manifest.json").unlink()
    for chunk in range(NUM_CHUNKS):
        path = cache_dir / f"chunk-{chunk:06d}.json"
        record = json.loads(path.read_text())
        path.write_text(json.dumps({**record, "cache_id": old_id, "count": 4 if chunk == 7 else 8}))
    tiny.run_synthesis(cache_dir)
    assert count_synthesis == [56]  # only the partial chunk 7
    assert_same_cache(cache_dir, reference)


def test_a_format_2_cache_of_other_settings_is_refused_naming_the_key(tmp_path, reference, forbid_synthesis):
    """Not upgraded (another identity) and not called an older format the library reads: the key that differs."""
    cache_dir = copy_cache(reference, tmp_path / "cache")
    identity = json.loads((cache_dir / "spec.json").read_text())
    old_spec = {**identity, "format_version": 2, "num_impressions": 64, "num_train_impressions": 64}
    old_spec["method"]["args"]["iterations"] = 7
    (cache_dir / "spec.json").write_text(json.dumps(old_spec))
    (cache_dir / "manifest.json").unlink()
    with pytest.raises(ZSKDError) as error:
        tiny.run_synthesis(cache_dir)
    message = str(error.value)
    assert "\n" not in message and "format-2" in message and "method.args.iterations: cached 7 vs now 5" in message
    assert tiny.shard_digests(cache_dir) == tiny.shard_digests(reference)  # nothing was touched


def test_a_manifest_of_another_identity_is_not_read_as_ours(tmp_path, reference):
    """A rank that reads the manifest alone (no checksums) compares the whole identity: a key our spec lacks (a
    bf16 cache's ``autocast`` against a float32 run) leaves it unread."""
    cache_dir = copy_cache(reference, tmp_path / "cache")
    spec = json.loads((cache_dir / "spec.json").read_text())
    cache = ImpressionCache(cache_dir, {**spec, "num_impressions": 64})
    assert cache.is_complete(verify=False)
    bf16 = ImpressionCache(tmp_path / "other", {**spec, "autocast": "bf16-mixed", "num_impressions": 64})
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    for shard in manifest["shards"]:
        shard["cache_id"] = bf16.cache_id
    (cache_dir / "manifest.json").write_text(json.dumps({**manifest, "autocast": "bf16-mixed"}))
    assert cache.read_manifest() is None and not cache.is_complete(verify=False)


# ------------------------------------------------------------------------------------- corruption, resume
def test_corrupted_shard_is_detected_and_redone(tmp_path, reference, count_synthesis):
    cache_dir = copy_cache(reference, tmp_path / "cache")
    flip_byte(cache_dir / "chunk-000005.inputs.npy")
    spec = json.loads((cache_dir / "spec.json").read_text())
    cache = ImpressionCache(cache_dir, {**spec, "num_impressions": 64})
    assert cache.missing_chunks() == [5]
    assert not cache.is_complete() and cache.is_complete(verify=False)
    tiny.run_synthesis(cache_dir)
    assert count_synthesis == [40]  # only chunk 5 was made again
    assert cache.missing_chunks() == [] and cache.is_complete()
    assert_same_cache(cache_dir, reference)


def test_resume_after_a_crash_mid_chunk(tmp_path, reference, monkeypatch, count_synthesis):
    """The 3rd chunk's write fails after its inputs file: the rerun redoes only unfinished chunks."""
    cache_dir = tmp_path / "cache"
    write_atomic = cache_module.write_atomic

    def failing(path, write):
        if path.endswith("chunk-000002.targets.npy"):
            # what a hard crash (kill -9) mid-write leaves behind
            Path(partial_path(path)).write_bytes(b"half a file")
            raise OSError("disk full (simulated)")
        write_atomic(path, write)

    monkeypatch.setattr(cache_module, "write_atomic", failing)
    with pytest.raises(ZSKDError, match="cannot write chunk 2 .*simulated"):
        tiny.run_synthesis(cache_dir)
    assert (cache_dir / "chunk-000002.inputs.npy").exists() and not (cache_dir / "chunk-000002.json").exists()
    assert list(cache_dir.glob("*.tmp")) and not (cache_dir / "manifest.json").exists()
    spec = json.loads((cache_dir / "spec.json").read_text())
    assert ImpressionCache(cache_dir, {**spec, "num_impressions": 64}).missing_chunks() == [2, 3, 4, 5, 6, 7]

    monkeypatch.setattr(cache_module, "write_atomic", write_atomic)
    count_synthesis.clear()
    tiny.run_synthesis(cache_dir)
    assert count_synthesis == [16, 24, 32, 40, 48, 56]
    assert not list(cache_dir.glob("*.tmp"))
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["resumed_chunks"] == 2  # chunks 0 and 1, finished before the crash
    assert manifest["resumed_seconds"] == sum(shard["seconds"] for shard in manifest["shards"][:2]) > 0
    assert_same_cache(cache_dir, reference)


def test_resume_after_sigkill(tmp_path, reference, count_synthesis):
    """SIGKILL a synthesis subprocess once a chunk is finished but before the manifest; rerun; same bytes."""
    cache_dir = tmp_path / "cache"
    command = [sys.executable, str(tiny.SCRIPT), "--cache", str(cache_dir), "--slow", "0.5", "--no-grid",
               "--threads", str(torch.get_num_threads())]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            env=tiny.script_env(torch.get_num_threads()))
    killed_with_chunks = None
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if list(cache_dir.glob("chunk-*.json")):
                os.killpg(proc.pid, signal.SIGKILL)
                killed_with_chunks = sorted(p.name for p in cache_dir.glob("chunk-*.json"))
                break
            time.sleep(0.02)
    finally:
        tiny._kill_group(proc.pid)
        output = proc.communicate()[0].decode(errors="replace")
    assert killed_with_chunks, f"no chunk record appeared before the run ended or timed out:\n{output[-3000:]}"
    assert proc.returncode == -signal.SIGKILL
    assert not (cache_dir / "manifest.json").exists()
    spec = json.loads((cache_dir / "spec.json").read_text())
    missing = ImpressionCache(cache_dir, {**spec, "num_impressions": 64}).missing_chunks()
    assert 0 < len(missing) < NUM_CHUNKS

    tiny.run_synthesis(cache_dir)
    assert count_synthesis == [8 * c for c in missing]  # finished chunks were kept
    assert_same_cache(cache_dir, reference)


# ----------------------------------------------------------------------------------------- the zskd command
def test_zskd_synthesize_fills_a_cache_that_fit_reuses(tmp_path, monkeypatch):
    cache_dir = tmp_path / "impressions"
    config = {
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False,
                    "default_root_dir": str(tmp_path / "run")},
        "model": {
            "class_path": "zskd_lightning.DistillationModule",
            "init_args": {
                "teacher": {"class_path": "zskd_lightning.FrozenTeacher", "init_args": {
                    "network": {"class_path": "zskd_lightning.models.DigitsConvNet",
                                "init_args": {"in_channels": 1, "num_classes": 10}},
                    "checkpoint": str(tiny.SHIPPED_TEACHER)}},
                "student": {"class_path": "zskd_lightning.models.DigitsConvNetHalf",
                            "init_args": {"in_channels": 1, "num_classes": 10}},
            },
        },
        "data": {
            "class_path": "zskd_lightning.ImpressionDataModule",
            "init_args": {
                "synthesizer": {"class_path": "zskd_lightning.ZSKDSynthesizer",
                                "init_args": {"iterations": 3, "lr": 0.05}},
                "num_impressions": 24, "num_val_impressions": 8, "chunk_size": 8, "seed": 3,
                "cache_dir": str(cache_dir),
                "eval_data": {"class_path": "zskd_lightning.data.DigitsDataModule"},
            },
        },
    }
    config_path = tmp_path / "synthesize.yaml"
    config_path.write_text(yaml.safe_dump(config))
    result = subprocess.run([*tiny.zskd_command(), "synthesize", "--config", str(config_path)], capture_output=True, text=True,
                            timeout=180, env=tiny.script_env(1), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["num_impressions"] == 32 and len(manifest["shards"]) == 4
    before = mtimes(cache_dir)

    # a later fit, built in Python with the same settings, reuses it without synthesizing anything
    def refuse(self, *args, **kwargs):
        raise AssertionError("the cache made by `zskd synthesize` should have been reused")

    monkeypatch.setattr(Synthesizer, "invert", refuse)
    import lightning as L

    from zskd_lightning import DistillationModule
    from zskd_lightning.models import DigitsConvNetHalf

    teacher = tiny.shipped_teacher()
    datamodule = ImpressionDataModule(ZSKDSynthesizer(iterations=3, lr=0.05), num_impressions=24,
                                      num_val_impressions=8, chunk_size=8, seed=3, cache_dir=str(cache_dir),
                                      eval_data=DigitsDataModule())
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path / "fit")
    trainer.fit(DistillationModule(teacher, DigitsConvNetHalf(1, 10), export_filename=None), datamodule=datamodule)
    assert trainer.global_step > 0
    assert mtimes(cache_dir) == before


# --------------------------------------------------------------------- foreign, corrupt or non-finite data
def test_a_chunk_of_another_seed_merged_into_the_folder_is_redone(tmp_path, reference, count_synthesis):
    other = tmp_path / "seed1"
    tiny.run_synthesis(other, seed=1, grid=False)
    count_synthesis.clear()
    cache_dir = copy_cache(reference, tmp_path / "cache")
    (cache_dir / "manifest.json").unlink()  # as the multi-node recipe merges chunk files before the last run
    for path in other.glob("chunk-000003.*"):
        (cache_dir / path.name).write_bytes(path.read_bytes())
    with pytest.warns(UserWarning, match="chunk 3 is made again: its record belongs to another cache"):
        tiny.run_synthesis(cache_dir, grid=False)
    assert count_synthesis == [24]
    assert_same_cache(cache_dir, reference)


def test_another_teachers_chunks_are_never_adopted_without_spec_and_manifest(tmp_path, reference, count_synthesis):
    cache_dir = copy_cache(reference, tmp_path / "cache")
    (cache_dir / "spec.json").unlink()
    (cache_dir / "manifest.json").unlink()
    other_teacher = tiny.make_net(5)
    with pytest.warns(UserWarning, match="belongs to another cache"):
        tiny.run_synthesis(cache_dir, teacher=other_teacher, grid=False)
    assert count_synthesis == list(range(0, 64, 8))  # every chunk made anew for this teacher
    assert all(tiny.shard_digests(cache_dir)[n] != d for n, d in tiny.shard_digests(reference).items()
               if "inputs" in n)


def test_a_corrupt_shard_is_redone_and_said_so(tmp_path, reference, count_synthesis):
    cache_dir = copy_cache(reference, tmp_path / "cache")
    flip_byte(cache_dir / "chunk-000002.targets.npy")
    with pytest.warns(UserWarning, match="chunk 2 is made again: its targets shard does not match its checksum"):
        tiny.run_synthesis(cache_dir, grid=False)
    assert count_synthesis == [16]
    assert_same_cache(cache_dir, reference)


def nan_teacher() -> torch.nn.Module:
    teacher = tiny.make_net(0)
    with torch.no_grad():
        teacher.body[-1].bias.fill_(float("nan"))
    return teacher


def test_a_teacher_that_outputs_nan_stops_synthesis_in_one_line(tmp_path):
    with pytest.raises(ZSKDError) as error:
        tiny.run_synthesis(tmp_path / "cache", teacher=nan_teacher(), grid=False)
    message = str(error.value)
    assert "\n" not in message and "chunk 0" in message and "non-finite" in message
    assert not (tmp_path / "cache" / "manifest.json").exists()
    assert not list((tmp_path / "cache").glob("chunk-*"))  # nothing of it is written


def test_a_teacher_that_turns_nan_midway_keeps_the_chunks_finished_before(tmp_path, monkeypatch):
    """The README's errors table: 'earlier finished chunks only, no manifest'."""

    class TurnsNaN(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.network, self.broken = tiny.make_net(0), False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.network(x)
            return out * float("nan") if self.broken else out

    teacher = TurnsNaN()
    write_chunk = ImpressionCache.write_chunk

    def write_then_break(cache, chunk, *args, **kwargs):
        write_chunk(cache, chunk, *args, **kwargs)
        teacher.broken = chunk >= 1  # chunks 0 and 1 finish; chunk 2 meets a NaN teacher

    monkeypatch.setattr(ImpressionCache, "write_chunk", write_then_break)
    with pytest.raises(ZSKDError, match="chunk 2 of impression cache .* non-finite"):
        tiny.run_synthesis(tmp_path / "cache", teacher=teacher, grid=False)
    cache_dir = tmp_path / "cache"
    assert not (cache_dir / "manifest.json").exists()
    kept = {p.name: p.read_bytes() for p in cache_dir.glob("chunk-*")}
    assert sorted(p for p in kept if p.endswith(".json")) == ["chunk-000000.json", "chunk-000001.json"]
    monkeypatch.undo()
    teacher.broken = False
    _, datamodule = tiny.run_synthesis(cache_dir, teacher=teacher, grid=False)  # resumes from chunk 2
    assert datamodule._require_cache().is_complete()
    assert all((cache_dir / name).read_bytes() == content for name, content in kept.items())


def test_a_non_finite_distillation_loss_stops_training_in_one_line():
    module = DistillationModule(nan_teacher(), tiny.make_net(1, width=4), export_filename=None)
    module.log = lambda *args, **kwargs: None
    with pytest.raises(ZSKDError, match=r"not finite \(nan\) at step 0"):
        module.training_step((torch.randn(4, 1, 8, 8), torch.rand(4, 10)), 0)


def test_a_zero_or_0_255_input_std_is_refused_in_one_line(tmp_path):
    with pytest.raises(ZSKDError, match=r"input_std must be > 0 in every channel, got \[0.0\]"):
        ImpressionDataModule(ZSKDSynthesizer(), 8, str(tmp_path / "cache"), input_shape=(1, 8, 8), input_mean=[0.5],
                             input_std=[0.0])
    with pytest.raises(ZSKDError, match=r"of pixel values in \[0, 1\].*got mean \[125.3\] and std \[63.0\]"):
        ImpressionDataModule(ZSKDSynthesizer(), 8, str(tmp_path / "cache"), input_shape=(1, 8, 8),
                             input_mean=[125.3], input_std=[63.0])  # 0-255 statistics


# ------------------------------------------------------------------------------------------ no data lost
def test_a_folder_that_is_not_a_cache_is_refused_and_its_files_kept(tmp_path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "thesis.tex.tmp").write_text("three years of work")
    with pytest.raises(ZSKDError) as error:
        tiny.run_synthesis(folder, grid=False)
    message = str(error.value)
    assert "\n" not in message and "holds no impression cache" in message and "thesis.tex.tmp" in message
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.tex.tmp"]  # untouched: no .lock left either
    tiny.run_synthesis(folder, grid=False, overwrite_cache=True)  # told to: the cache goes beside the file
    assert (folder / "thesis.tex.tmp").read_text() == "three years of work"
    assert (folder / "manifest.json").exists()


def test_only_the_caches_own_temporary_files_are_deleted(tmp_path, reference):
    cache_dir = copy_cache(reference, tmp_path / "cache")
    (cache_dir / "manifest.json").unlink()
    (cache_dir / "notes.tmp").write_text("mine")
    (cache_dir / "chunk-000001.inputs.npy.4242.tmp").write_bytes(b"half")
    tiny.run_synthesis(cache_dir, grid=False)
    assert (cache_dir / "notes.tmp").read_text() == "mine"
    assert not (cache_dir / "chunk-000001.inputs.npy.4242.tmp").exists()


def test_a_cache_being_filled_by_another_run_is_refused_in_one_line(tmp_path, count_synthesis):
    cache = tiny.make_datamodule(tmp_path / "cache").impression_plan.cache_for(tiny.make_net(0))
    with cache.locked():
        with pytest.raises(ZSKDError) as error:
            tiny.run_synthesis(tmp_path / "cache", grid=False)
    message = str(error.value)
    assert "\n" not in message and f"being filled by another run (process {os.getpid()}" in message
    assert count_synthesis == []
    tiny.run_synthesis(tmp_path / "cache", grid=False)  # released: the next run proceeds
    assert (tmp_path / "cache" / "manifest.json").exists()


def test_a_grid_that_cannot_be_written_is_a_warning_not_a_failed_fit(tmp_path, reference, monkeypatch):
    """Rank 0 alone draws it: an error there would leave the other ranks of a DDP fit waiting."""
    from zskd_lightning import pictures

    def disk_full(picture, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pictures, "save_picture", disk_full)
    with pytest.warns(UserWarning, match=r"the impressions picture was not written to .*impressions.png: OSError: .*No "
                                         r"space left"):
        tiny.run_synthesis(copy_cache(reference, tmp_path / "cache"), fit=True)


def test_a_complete_cache_is_reused_while_another_run_holds_its_lock(tmp_path, reference, count_synthesis):
    """A complete cache is only read: runs sharing one (a sweep of students) need not wait for its lock."""
    cache_dir = copy_cache(reference, tmp_path / "cache")
    cache = tiny.make_datamodule(cache_dir).impression_plan.cache_for(tiny.make_net(0))
    with cache.locked():
        tiny.run_synthesis(cache_dir, grid=False)
    assert count_synthesis == [] and tiny.shard_digests(cache_dir) == tiny.shard_digests(reference)


def test_a_rank_that_does_not_see_the_cache_fails_in_one_line(tmp_path, reference, monkeypatch):
    """Rank 1 of a fake 2-process run whose ``cache_dir`` is its node's own (empty) folder."""
    from types import SimpleNamespace

    from zskd_lightning.errors import RankSharedError
    from zskd_lightning.impressions import driver

    trainer = SimpleNamespace(world_size=2, global_rank=1,
                              strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision))
    monkeypatch.setattr(driver, "every_rank", lambda message: [None, message])
    unseen = tiny.make_datamodule(tmp_path / "node1").impression_plan.cache_for(tiny.make_net(0))
    with pytest.raises(RankSharedError, match=r"^impression synthesis failed on rank 1: rank 1 on .* does not see the "
                                              r"complete impression cache .*: cache_dir must be a folder every node "
                                              r"shares$"):
        driver._check_every_rank_sees(trainer, unseen)
    seen = tiny.make_datamodule(reference).impression_plan.cache_for(tiny.make_net(0))
    driver._check_every_rank_sees(trainer, seen)  # its manifest is there: nothing raised


def test_validate_says_why_a_cache_is_not_complete(tmp_path):
    tiny.run_synthesis(tmp_path / "cache", grid=False, num_impressions=16, num_val_impressions=8)

    def validate(**settings):
        model = DistillationModule(teacher=tiny.make_net(0), student=tiny.make_net(1, width=4), export_filename=None)
        datamodule = tiny.make_datamodule(tmp_path / "cache", **{"num_impressions": 16, "num_val_impressions": 8,
                                                                 **settings})
        with pytest.raises(ZSKDError) as error:
            tiny.quiet_trainer(tmp_path).validate(model, datamodule=datamodule)
        message = str(error.value)
        assert "\n" not in message and message.startswith("validate reads the impressions of a complete cache")
        return message

    assert "has other settings (seed: cached 0 vs now 1)" in validate(seed=1)
    assert "(it holds 3 chunk(s) of 8; this budget needs 5)" in validate(num_impressions=32)
    (tmp_path / "cache" / "manifest.json").unlink()
    assert "(its synthesis has not finished): run `zskd fit`" in validate()


def test_a_file_system_without_locks_is_a_warning(tmp_path, monkeypatch):
    import errno

    from types import SimpleNamespace

    def no_flock(handle, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    fcntl = cache_module.fcntl  # the cache module's own reference only: nothing else in the process is touched
    monkeypatch.setattr(cache_module, "fcntl", SimpleNamespace(flock=no_flock, LOCK_EX=fcntl.LOCK_EX,
                                                               LOCK_NB=fcntl.LOCK_NB))
    with pytest.warns(UserWarning, match=r"has no file locks \(Function not implemented\): nothing stops two runs"):
        tiny.run_synthesis(tmp_path / "cache", grid=False)
    assert (tmp_path / "cache" / "manifest.json").exists()


def test_a_lock_left_by_a_killed_run_does_not_block(tmp_path, reference):
    """The OS releases the lock when its process dies: a killed run's ``.lock`` file is harmless."""
    script = ("import sys, os, time; sys.path.insert(0, sys.argv[2]); from helpers import tiny; "
              "cache = tiny.make_datamodule(sys.argv[1]).impression_plan.cache_for(tiny.make_net(0)); "
              "cm = cache.locked(); cm.__enter__(); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "cache"), str(Path(__file__).parent)],
                            stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)  # a child stuck before it locks: fail, not hang
        assert ready and proc.stdout.readline().strip() == "locked"
    finally:
        proc.kill()
        proc.wait()
    assert (tmp_path / "cache" / ".lock").exists()
    tiny.run_synthesis(tmp_path / "cache", grid=False)
    assert (tmp_path / "cache" / "manifest.json").exists()


# ---------------------------------------------------------------------------- bad input, before the work
@pytest.mark.parametrize(("key", "value", "message"), [
    ("batch_size", 0, "batch_size must be >= 1, got 0"),
    ("batch_size", -4, "batch_size must be >= 1, got -4"),
    ("eval_batch_size", 0, "eval_batch_size must be >= 1, got 0"),
    ("num_workers", -1, "num_workers must be >= 0, got -1"),
    ("seed", -1, "seed must be >= 0, got -1"),
    ("num_val_impressions", -8, "num_val_impressions must be >= 0, got -8"),
    ("chunk_size", 0, "chunk_size must be >= 1, got 0"),
])
def test_bad_datamodule_settings_are_refused_in_one_line(tmp_path, key, value, message):
    with pytest.raises(ZSKDError, match=re.escape(message)):
        tiny.make_datamodule(tmp_path / "cache", **{key: value})


@pytest.mark.parametrize("given", ["input_mean", "input_std"])
def test_input_mean_or_std_alone_is_refused_in_one_line(tmp_path, given):
    """Alone, one would be dropped (no eval_data) or paired with eval_data's other: a wrong valid range."""
    missing = {"input_mean": "input_std", "input_std": "input_mean"}[given]
    with pytest.raises(ZSKDError, match=f"^{given} is given without {missing}: give both"):
        ImpressionDataModule(ZSKDSynthesizer(), 8, str(tmp_path / "cache"), input_shape=(1, 8, 8),
                             eval_data=DigitsDataModule(), **{given: [0.5]})


def test_evaluation_data_is_downloaded_in_prepare_data_once(tmp_path, monkeypatch):
    """Lightning calls ``prepare_data`` on one process per node: the synthetic datamodules pass it on to their
    real data, so DDP ranks never download into one folder side by side (``setup`` only reads)."""
    calls = []
    monkeypatch.setattr(DigitsDataModule, "prepare_data", lambda self: calls.append(self))
    eval_data, predict_data = DigitsDataModule(), DigitsDataModule()
    ImpressionDataModule(ZSKDSynthesizer(), 8, str(tmp_path / "cache"), eval_data=eval_data,
                         predict_data=predict_data).prepare_data()
    assert calls == [eval_data, predict_data]


def test_a_precision_that_casts_the_teacher_is_refused_before_synthesis(tmp_path, count_synthesis):
    with pytest.raises(ZSKDError, match="^Trainer precision 'bf16-true' casts the teacher's weights.*'bf16-mixed'"):
        tiny.run_synthesis(tmp_path / "cache", precision="bf16-true")
    assert count_synthesis == [] and not (tmp_path / "cache").exists()


def test_a_negative_synthesis_lr_is_refused():
    with pytest.raises(ZSKDError, match=r"lr must be > 0, got -0.1"):
        ZSKDSynthesizer(lr=-0.1)


def test_a_cache_dir_that_is_a_file_is_refused_in_one_line(tmp_path):
    path = tmp_path / "cache"
    path.write_text("not a folder")
    with pytest.raises(ZSKDError, match="is a file, not a folder"):
        tiny.run_synthesis(path, grid=False)
    assert path.read_text() == "not a folder"


def test_missing_evaluation_data_is_reported_before_any_synthesis(tmp_path, count_synthesis):
    from zskd_lightning.data import MNISTDataModule

    datamodule = ImpressionDataModule(ZSKDSynthesizer(iterations=5), 64, str(tmp_path / "cache"), chunk_size=8,
                                      eval_data=MNISTDataModule(root=str(tmp_path / "no-data"), download=False))
    model = DistillationModule(tiny.make_net(0), tiny.make_net(1, width=4), export_filename=None)
    with pytest.raises(ZSKDError, match="files not found"):
        tiny.quiet_trainer(tmp_path).fit(model, datamodule=datamodule)
    assert count_synthesis == [] and not (tmp_path / "cache").exists()


def test_a_cache_dir_that_cannot_be_made_is_refused_in_one_line(tmp_path):
    with pytest.raises(ZSKDError) as error:
        tiny.run_synthesis("/proc/zskd-cache", grid=False, root=tmp_path)
    assert "\n" not in str(error.value) and "/proc/zskd-cache" in str(error.value)


def test_a_full_disk_ends_in_one_line_and_keeps_the_finished_chunks(tmp_path, reference, monkeypatch,
                                                                   count_synthesis):
    written = []
    original = np.save

    def save(handle, array, *args, **kwargs):
        if len(written) >= 6:  # two chunks of three shards fit, then the disk is full
            raise OSError(28, "No space left on device")
        written.append(1)
        return original(handle, array, *args, **kwargs)

    monkeypatch.setattr(cache_module.np, "save", save)
    full = "cannot write chunk 2 of the impression cache .*No space left on device"
    with pytest.raises(ZSKDError, match=full) as err:
        tiny.run_synthesis(tmp_path / "cache", grid=False)
    assert "\n" not in str(err.value)
    monkeypatch.setattr(cache_module.np, "save", original)
    assert not list((tmp_path / "cache").glob("*.tmp"))
    count_synthesis.clear()
    tiny.run_synthesis(tmp_path / "cache", grid=False)  # resumes: chunks 0-1 kept, the rest made
    assert count_synthesis and min(count_synthesis) == 16  # chunks of 8: chunk 2 onwards, never 0 or 1 again
    assert_same_cache(tmp_path / "cache", reference)


def test_an_object_array_shard_with_a_matching_record_is_redone(tmp_path, reference, count_synthesis):
    """A crafted shard of Python objects, its record rewritten to match its checksum, is never loaded."""
    cache_dir = copy_cache(reference, tmp_path / "cache")
    (cache_dir / "manifest.json").unlink()
    shard = cache_dir / "chunk-000001.labels.npy"
    np.save(shard, np.array([{"a": 1}] * 8, dtype=object), allow_pickle=True)
    record_path = cache_dir / "chunk-000001.json"
    record = json.loads(record_path.read_text())
    record["sha256"]["labels"] = tiny.sha256(shard)
    record_path.write_text(json.dumps(record))
    with pytest.warns(UserWarning, match="chunk 1 is made again: its labels shard holds 8 rows of object"):
        tiny.run_synthesis(cache_dir, grid=False)
    assert count_synthesis == [8]
    assert_same_cache(cache_dir, reference)


def test_a_chunk_with_finite_inputs_but_nan_targets_leaves_no_file(tmp_path):
    cache = tiny.make_datamodule(tmp_path / "cache").impression_plan.cache_for(tiny.make_net(0))
    cache.prepare()
    targets = torch.full((8, 10), float("nan"))
    with pytest.raises(ZSKDError, match="chunk 0 .* the synthesized targets hold non-finite values"):
        cache.write_chunk(0, torch.zeros(8, 1, 8, 8), targets, torch.zeros(8, dtype=torch.long), 0.0, 1.0)
    assert not list((tmp_path / "cache").glob("chunk-*"))
