"""User-facing errors: one clear line, no deep stack trace (the CLI prints them and exits 2)."""


class ZSKDError(RuntimeError):
    """Bad input the user can fix: a missing file, a wrong shape, a stale cache, a mismatch."""
