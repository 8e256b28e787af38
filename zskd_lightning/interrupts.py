"""Holding Ctrl-C (SIGINT) back over statements that must all run or none, so a checkpoint never sees half."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Run the block whole: a SIGINT that arrives inside it is delivered when it ends (to the handler installed
    before; Python's default raises ``KeyboardInterrupt``, on which Lightning runs ``on_exception`` callbacks such
    as ``OnExceptionCheckpoint``), not in the middle. Outside the main thread (signals reach only that one), or
    when SIGINT is ignored or has a handler set outside Python, the block runs as it is. Nests; costs two
    ``signal.signal`` calls (microseconds)."""
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if previous is None or previous is signal.SIG_IGN:
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)
