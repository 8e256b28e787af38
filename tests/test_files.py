"""Crash-safe writes: a failure mid-write leaves the previous file whole and no temporary file behind."""

from __future__ import annotations

import csv
import re
import threading

import pytest

from zskd_lightning.files import PARTIAL_SUFFIX, partial_path, write_atomic, write_csv_atomic, write_text_atomic


def test_a_write_that_fails_halfway_keeps_the_old_file(tmp_path):
    path = tmp_path / "results.md"
    write_text_atomic(path, "old\n")

    def crash_after_some_bytes(handle):
        handle.write(b"half of the new")
        raise KeyboardInterrupt  # e.g. Ctrl-C during a long benchmark

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, crash_after_some_bytes)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.md"]


def test_csv_round_trip(tmp_path):
    path = tmp_path / "rows.csv"
    rows = [{"row": "zskd", "test_acc": "97.63"}, {"row": "ci", "test_acc": "97.07"}]
    write_csv_atomic(path, rows, ["row", "test_acc"])
    write_csv_atomic(path, rows[:1], ["row", "test_acc"])  # replaces, never appends
    assert list(csv.DictReader(path.open())) == rows[:1]


def test_two_writers_of_one_file_never_share_a_temporary_file(tmp_path):
    """Two threads of one process (as two processes with one pid on two nodes sharing a folder) write one path at
    once: each writes its own temporary file, so the file ends as one writer's bytes, whole."""
    path = tmp_path / "manifest.json"
    first_started, second_done = threading.Event(), threading.Event()

    def slow_first(handle):
        handle.write(b"first: ")
        first_started.set()
        assert second_done.wait(timeout=30)
        handle.write(b"all of it")

    writer = threading.Thread(target=write_atomic, args=(path, slow_first))
    writer.start()
    assert first_started.wait(timeout=30)
    write_atomic(path, lambda handle: handle.write(b"second, whole"))
    assert path.read_bytes() == b"second, whole"
    second_done.set()
    writer.join(timeout=30)
    assert path.read_bytes() == b"first: all of it"  # the last rename wins, whole (one shared name mixed them)
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_temporary_names_are_new_each_write_and_recognized():
    names = {partial_path("/cache/spec.json") for _ in range(100)}
    assert len(names) == 100
    assert all(re.fullmatch(re.escape("/cache/spec.json") + PARTIAL_SUFFIX, name) for name in names)
    assert re.fullmatch(r"x" + PARTIAL_SUFFIX, "x.4242.tmp")  # what releases before this one left behind
