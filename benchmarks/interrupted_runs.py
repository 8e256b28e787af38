"""Resuming a table row whose training was interrupted (a kill, a crash, the end of a session).

Before a row's ``zskd fit`` starts, :func:`begin` writes ``table_run.json`` into the row's run folder (its
``trainer.default_root_dir``): the command, the configs' fingerprint, when the row was first started, when this
run started, and the seconds of work that earlier runs finished. Lightning's default checkpoint callback keeps
the latest epoch's checkpoint under that folder. Started again with the same command and fingerprint, the row
resumes from the newest checkpoint written since it was first started (``--ckpt_path``), and its times add the
earlier runs' work up to that checkpoint, read from file modification times: the work lost after the last
checkpoint is not counted, and neither is a checkpoint of another command or of older configs.
:func:`finish` removes the marker once the row is recorded.

Times are wall seconds. Training seconds of an earlier run start when its synthesis finished (the impression
cache's manifest was written) or, without synthesis in that run, when the run started.

Each run's origin (the code's commit and the hardware, taken when it starts) is kept in the marker too, so a row
finished by a later run records every machine it ran on and the oldest commit; a row is never resumed on another
kind of device (a CPU row's checkpoint on a GPU): it starts afresh there.
"""

from __future__ import annotations

import json
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from zskd_lightning.files import write_text_atomic

MARKER = "table_run.json"


@dataclass(frozen=True)
class Resumption:
    """Where an interrupted row goes on: ``checkpoint`` to load, and the earlier runs' work up to it (seconds):
    ``wall_seconds`` in all, ``training_seconds`` of it after their synthesis finished."""

    checkpoint: Path
    wall_seconds: float
    training_seconds: float
    #: the earlier runs' origins, oldest first: ``{"commit", "hardware", "device"}``
    origins: tuple[dict, ...] = ()


def newest_checkpoint(run_dir: Path, since: float) -> Path | None:
    """The most recently written whole ``*.ckpt`` under ``run_dir`` (any depth) whose modification time is at or
    after ``since`` (seconds since the epoch); ``None`` when there is none. Whole: a zip archive with its central
    directory, as ``torch.save`` writes one (a save cut off by ``kill -9``, e.g. a copy from another file system's
    temporary file, lacks it), so a cut file never stands in for the whole one before it."""
    written = [(path.stat().st_mtime, path) for path in run_dir.rglob("*.ckpt") if path.is_file()]
    fresh = sorted(((mtime, path) for mtime, path in written if mtime >= since), reverse=True)
    return next((path for _, path in fresh if zipfile.is_zipfile(path)), None)


def begin(run_dir: Path, command: str, fingerprint: str, manifest: Path | None = None,
          now: float | None = None, origin: dict | None = None) -> Resumption | None:
    """Record that the row ``command`` (configs ``fingerprint``) starts now in ``run_dir``; return where an
    earlier, interrupted run of the same row left off, or ``None`` to start from scratch.

    ``manifest``: the row's impression-cache manifest, if it has a cache (its modification time tells when an
    earlier run's synthesis finished). ``origin``: this run's ``{"commit", "hardware", "device"}``; an earlier run
    on another ``device`` is not resumed.
    """
    now = time.time() if now is None else now
    marker = run_dir / MARKER
    state = _read(marker)
    same_row = state is not None and state.get("command") == command and state.get("configs_sha") == fingerprint
    if same_row and not isinstance(state.get("origins"), list):  # written before origins were kept
        print(f"    {run_dir}: the interrupted run of this row recorded no machine or commit: starting afresh",
              flush=True)
        same_row = False
    earlier = [o for o in state.get("origins", []) if isinstance(o, dict)] if same_row else []
    other_device = sorted({o.get("device") for o in earlier} - {origin.get("device")}) if origin else []
    if other_device:
        print(f"    {run_dir}: the interrupted run of this row ran on {', '.join(map(str, other_device))}, this one "
              f"on {origin.get('device')}: starting afresh", flush=True)
    checkpoint = newest_checkpoint(run_dir, state["first_started"]) if same_row and not other_device else None
    if checkpoint is None:
        resumption, first_started, wall, training, earlier = None, now, 0.0, 0.0, []
    else:
        written = checkpoint.stat().st_mtime
        synthesized = manifest.stat().st_mtime if manifest is not None and manifest.exists() else 0.0
        wall = state["wall_seconds"] + max(0.0, written - state["started"])
        training = state["training_seconds"] + max(0.0, written - max(state["started"], synthesized))
        resumption = Resumption(checkpoint, wall, training, tuple(earlier))
        first_started = state["first_started"]
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(marker, json.dumps({
        "command": command, "configs_sha": fingerprint, "first_started": first_started, "started": now,
        "wall_seconds": wall, "training_seconds": training, "origins": [*earlier, *([origin] if origin else [])],
    }, indent=1))
    return resumption


def finish(run_dir: Path) -> None:
    """The row is recorded: forget its marker (a later run of it starts from scratch)."""
    (run_dir / MARKER).unlink(missing_ok=True)


def _read(marker: Path) -> dict | None:
    """The marker's fields, or ``None`` when absent or unreadable (a marker cut short starts the row afresh)."""
    try:
        state = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    fields = ("first_started", "started", "wall_seconds", "training_seconds")
    if not isinstance(state, dict) or not all(isinstance(state.get(f), (int, float)) for f in fields):
        return None
    return state
