"""A row's command run to completion with its output captured, while the person waiting for it sees it progress.

A table row runs for minutes to hours with Lightning's progress bar off (its output is parsed afterwards), so
without this the runner said nothing until the row ended. :func:`run_watched` passes each line the command writes
to stderr on as it comes (synthesis progress, warnings, errors) and, for a fit writing checkpoints into a run
folder, prints a line each time an epoch's checkpoint appears there (an online row prints nothing per epoch).
What it returns is what ``subprocess.run(capture_output=True, text=True)`` returns.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, TextIO

import yaml

#: seconds between two looks into the run folder for new epoch checkpoints
POLL_SECONDS = 20.0
#: Lightning's default checkpoint name, ``epoch=E-step=S.ckpt`` (``E`` counts from 0)
EPOCH_CHECKPOINT = re.compile(r"epoch=(\d+)-step=(\d+)(?:-v\d+)?\.ckpt$")


def saved_epochs(run_dir: Path) -> int:
    """How many epochs the newest epoch checkpoint under ``run_dir`` (any ``version_N``) has completed, 0 when
    none: ``epoch=E-step=S.ckpt`` is saved after epoch ``E`` (0-based), so ``E + 1``."""
    epochs = [int(match.group(1)) + 1 for path in run_dir.glob("lightning_logs/version_*/checkpoints/*.ckpt")
              if (match := EPOCH_CHECKPOINT.search(path.name))]
    return max(epochs, default=0)


def planned_epochs(run_dir: Path) -> int | None:
    """``trainer.max_epochs`` of the newest run under ``run_dir`` (the ``config.yaml`` the CLI writes at its
    start), or ``None`` when there is none yet or it cannot be read."""
    configs = sorted(run_dir.glob("lightning_logs/version_*/config.yaml"), key=lambda p: p.stat().st_mtime)
    if not configs:
        return None
    try:
        epochs = (yaml.safe_load(configs[-1].read_text()) or {}).get("trainer", {}).get("max_epochs")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return epochs if isinstance(epochs, int) and epochs > 0 else None


def _collect(stream: IO[str], into: list[str], echo: TextIO | None, prefix: str) -> None:
    for line in stream:
        into.append(line)
        if echo is not None:
            echo.write(prefix + line)
            echo.flush()


def _watch_epochs(run_dir: Path, reported: int, done: threading.Event, started: float, echo: TextIO, prefix: str,
                  poll_seconds: float) -> None:
    finished = False
    while not finished:
        finished = done.wait(poll_seconds)  # one last look once the command has ended
        saved = saved_epochs(run_dir)
        if saved > reported:
            planned = planned_epochs(run_dir)
            minutes = (time.perf_counter() - started) / 60
            echo.write(f"{prefix}[{time.strftime('%H:%M:%S')}] epoch {saved}{f'/{planned}' if planned else ''} "
                       f"saved, {minutes:.0f} min into this run\n")
            echo.flush()
            reported = saved


def run_watched(command: list[str], cwd: Path, run_dir: Path | None = None, echo: TextIO | None = None,
                prefix: str = "  | ", poll_seconds: float = POLL_SECONDS) -> subprocess.CompletedProcess:
    """Run ``command`` in ``cwd`` to its end; its stdout and stderr are captured (text) and returned as
    ``subprocess.run(command, cwd=cwd, capture_output=True, text=True)`` returns them.

    While it runs, each stderr line is written to ``echo`` (default: this process's stderr) after ``prefix``;
    with ``run_dir`` (the command's ``--trainer.default_root_dir``), a line each time an epoch checkpoint appears
    there (looked for every ``poll_seconds``)."""
    echo = sys.stderr if echo is None else echo
    reported = 0 if run_dir is None else saved_epochs(run_dir)  # a resumed run's earlier epochs are not news
    started = time.perf_counter()
    out: list[str] = []
    err: list[str] = []
    done = threading.Event()
    with subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          bufsize=1) as proc:
        readers = [threading.Thread(target=_collect, args=(proc.stdout, out, None, prefix), daemon=True),
                   threading.Thread(target=_collect, args=(proc.stderr, err, echo, prefix), daemon=True)]
        if run_dir is not None:
            readers.append(threading.Thread(target=_watch_epochs, daemon=True,
                                            args=(run_dir, reported, done, started, echo, prefix, poll_seconds)))
        for reader in readers:
            reader.start()
        try:
            returncode = proc.wait()
        finally:
            done.set()
            for reader in readers:
                reader.join()
    return subprocess.CompletedProcess(command, returncode, "".join(out), "".join(err))
