"""User-facing errors: one clear line, no deep stack trace (the CLI prints them and exits 2)."""


class ZSKDError(RuntimeError):
    """Bad input the user can fix: a missing file, a wrong shape, a stale cache, a mismatch."""


class InvalidArgument(ZSKDError, ValueError):
    """An argument outside its valid range (e.g. ``jitter=-1``); also a ``ValueError`` for code that catches those.

    Raised from constructors, so a bad value in a YAML config ends in one line naming the argument, not in
    jsonargparse's instantiation traceback.
    """
