"""Multi-process synthesis: 2-process CPU DDP (gloo) makes the same cache as 1 process, both ranks work, and an
error on either rank reaches every rank instead of hanging.

Each 2-process run is ``tests/helpers/synthesize_run.py`` in a subprocess (Lightning's DDP launcher re-runs the
script for rank 1) in its own process group, killed on timeout. Three such runs in all; the 1-process
references run in-process. Cache: the standard tiny cache (teacher ``make_net(0)``, 8 chunks of 8, 5 iterations).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny

from zskd_lightning.teacher import as_frozen_teacher

NUM_CHUNKS = 8
DDP_TIMEOUT = 120  # a normal 2-process run takes ~10-20 s on 2 busy cores


def describe(result) -> str:
    state = "timed out (killed)" if result.returncode is None else f"exit code {result.returncode}"
    return f"{state}\n--- stdout ---\n{result.stdout[-2000:]}\n--- stderr ---\n{result.stderr[-4000:]}"


def run_ddp(folder: Path, *args: str, threads: int | None, timeout: float = DDP_TIMEOUT):
    folder.mkdir(parents=True, exist_ok=True)
    result = tiny.run_script(["--cache", str(folder / "cache"), "--devices", "2", *args], timeout=timeout,
                             threads=threads)
    return result, tiny.read_rank_log(folder / "ranks.log")


@pytest.fixture(scope="module")
def single_one_thread(tmp_path_factory) -> Path:
    cache_dir = tmp_path_factory.mktemp("single_1t") / "cache"
    with tiny.torch_threads(1):
        tiny.run_synthesis(cache_dir, grid=False)
    return cache_dir


@pytest.fixture(scope="module")
def ddp_one_thread(tmp_path_factory):
    """2 processes, one torch thread each (OMP_NUM_THREADS=1 and torch.set_num_threads(1)); synthesis only."""
    folder = tmp_path_factory.mktemp("ddp_1t")
    result, log = run_ddp(folder, "--threads", "1", "--no-grid", threads=1)
    return folder / "cache", result, log


@pytest.fixture(scope="module")
def single_default(tmp_path_factory):
    """1 process with this process's default torch threads."""
    cache_dir = tmp_path_factory.mktemp("single_default") / "cache"
    threads = torch.get_num_threads()
    tiny.run_synthesis(cache_dir, grid=False)
    return cache_dir, threads


@pytest.fixture(scope="module")
def ddp_default(tmp_path_factory):
    """2 processes with all defaults: threads as Lightning sets them, the default callback (impression grid on),
    one epoch of training after synthesis, and the student's export."""
    folder = tmp_path_factory.mktemp("ddp_default")
    result, log = run_ddp(folder, "--fit", "--export", threads=None, timeout=2 * DDP_TIMEOUT)  # the heaviest run
    return folder, result, log


def test_two_processes_make_the_same_cache_as_one(ddp_one_thread, single_one_thread):
    cache_dir, result, _ = ddp_one_thread
    assert result.returncode == 0, describe(result)
    assert len(tiny.shard_digests(cache_dir)) == 3 * NUM_CHUNKS
    assert tiny.shard_digests(cache_dir) == tiny.shard_digests(single_one_thread)
    assert tiny.manifest_shards(cache_dir) == tiny.manifest_shards(single_one_thread)
    spec = json.loads((cache_dir / "spec.json").read_text())
    assert spec == json.loads((single_one_thread / "spec.json").read_text())
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert {k: manifest[k] for k in spec} == spec


def test_both_ranks_synthesized_their_share(ddp_one_thread):
    _, result, log = ddp_one_thread
    assert result.returncode == 0, describe(result)
    written = [(rank, int(chunk)) for rank, chunk, _ in log]
    assert sorted(chunk for _, chunk in written) == list(range(NUM_CHUNKS)), log  # each chunk exactly once
    for rank in (0, 1):  # rank r takes the r-th, (r + W)-th, ... missing chunk
        assert sorted(c for r, c in written if r == rank) == list(range(rank, NUM_CHUNKS, 2)), log
    assert {detail for _, _, detail in log} == {"threads=1"}
    assert "DONE rank=0" in result.stdout and "DONE rank=1" in result.stdout


def test_error_on_rank_zero_reaches_every_rank(tmp_path):
    """A cache from another teacher: rank 0 detects it, every rank raises, the run exits non-zero (no hang)."""
    other_teacher = as_frozen_teacher(tiny.make_net(5))
    tiny.make_datamodule(tmp_path / "cache").impression_plan.cache_for(other_teacher).prepare()
    result, log = run_ddp(tmp_path, "--threads", "1", "--no-grid", threads=1, timeout=90)
    assert result.returncode not in (0, None), describe(result)
    errors = {rank: detail for rank, what, detail in log if what == "ERROR"}
    assert set(errors) == {0, 1}, describe(result)
    assert all("RankSharedError" in e and "different teacher" in e for e in errors.values()), errors
    assert not list((tmp_path / "cache").glob("chunk-*")), "no rank should have synthesized anything"


def test_default_ddp_run_completes(ddp_default):
    """Everything default (impression grid on, fit after synthesis, the student exported: finding the log
    folder is a collective every rank must join) must finish on 2 processes."""
    folder, result, _ = ddp_default
    assert result.returncode == 0, describe(result)
    assert "DONE rank=0" in result.stdout and "DONE rank=1" in result.stdout
    assert (folder / "impressions.png").is_file()
    assert (folder / "student.safetensors").is_file() and (folder / "student.json").is_file()


def test_error_on_rank_one_while_synthesizing_reaches_every_rank(tmp_path):
    """Rank 1's chunk writes fail (a full disk): rank 1 raises its own one-line error, rank 0 (which finished its
    share) one naming rank 1's, and the run ends instead of waiting at the barrier; rank 0's chunks stay."""
    result, log = run_ddp(tmp_path, "--threads", "1", "--no-grid", "--fail-rank", "1", threads=1, timeout=90)
    assert result.returncode not in (0, None), describe(result)
    errors = {rank: detail for rank, what, detail in log if what == "ERROR"}
    assert set(errors) == {0, 1}, describe(result)
    assert errors[1].startswith("ZSKDError: cannot write chunk 1 of the impression cache"), errors
    assert errors[0].startswith("RankSharedError: impression synthesis failed on rank 1: cannot write chunk 1"), errors
    assert "No space left on device" in errors[0]
    assert sorted(int(what) for _, what, _ in log if what.isdigit()) == [0, 2, 4, 6]  # rank 0 wrote its share


def test_cache_identity_failing_on_rank_one_reaches_every_rank(tmp_path):
    """Rank 1 cannot derive the cache's identity (a file it reads is missing on its node) before any chunk is
    planned: rank 1 raises its own line, rank 0 one naming rank 1's, instead of waiting in the plan's broadcast."""
    result, log = run_ddp(tmp_path, "--threads", "1", "--no-grid", "--fail-identity-rank", "1", threads=1, timeout=90)
    assert result.returncode not in (0, None), describe(result)
    errors = {rank: detail for rank, what, detail in log if what == "ERROR"}
    assert errors == {
        1: "ZSKDError: cannot read the metadata file record.json: no such file on this node",
        0: "RankSharedError: impression synthesis failed on rank 1: cannot read the metadata file record.json: no "
           "such file on this node"}, describe(result)
    assert not [what for _, what, _ in log if what.isdigit()]  # no rank made a chunk


def test_cache_does_not_depend_on_thread_count(ddp_default, single_default):
    """Default threads: 1 process uses this process's count (2 on 2 cores), Lightning gives each of 2 DDP
    processes cores // 2. On the CPUs tested the shards are bit-identical anyway (no cross-thread reductions in
    these small kernels); if another machine differs, it is float summation order, not the chunking."""
    folder, result, log = ddp_default
    single_dir, single_threads = single_default
    manifest = folder / "cache" / "manifest.json"
    assert manifest.exists(), "the default 2-process run wrote no manifest:\n" + describe(result)
    ddp_threads = sorted({detail for _, _, detail in log})
    if ddp_threads == [f"threads={single_threads}"]:
        pytest.skip(f"one core: 1 process and 2 both ran {single_threads} thread(s), nothing to compare")
    assert tiny.shard_digests(folder / "cache") == tiny.shard_digests(single_dir), (
        f"1 process x {single_threads} threads vs 2 processes x {ddp_threads}"
    )
    assert tiny.manifest_shards(folder / "cache") == tiny.manifest_shards(single_dir)
