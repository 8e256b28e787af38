"""Crash-safe writes: a failure mid-write leaves the previous file whole and no temporary file behind."""

from __future__ import annotations

import csv

import pytest

from zskd_lightning.files import write_atomic, write_csv_atomic, write_text_atomic


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
