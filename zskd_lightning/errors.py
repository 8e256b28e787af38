"""User-facing errors: one clear line, no deep stack trace (the CLI prints them and exits 2)."""


class ZSKDError(RuntimeError):
    """Bad input the user can fix: a missing file, a wrong shape, a stale cache, a mismatch."""


class InvalidArgument(ZSKDError, ValueError):
    """An argument outside its valid range (e.g. ``jitter=-1``); also a ``ValueError`` for code that catches those.

    Raised from constructors, so a bad value in a YAML config ends in one line naming the argument, not in
    jsonargparse's instantiation traceback.
    """


class RankSharedError(ZSKDError):
    """A ZSKDError raised alike on every rank (a decision global rank 0 broadcast, e.g. an unusable cache folder):
    the CLI prints it once, from global rank 0, instead of once per process."""


#: Why an online fit refuses ``target_source='batch'`` (its replay-buffer batches hold inputs and no soft targets):
#: said by ``DistillationModule`` at a replay step and, earlier, by ``OnlineSynthesis`` at setup.
REPLAY_NEEDS_TEACHER_TARGETS = ("target_source='batch' distils to the soft targets a batch carries; replay-buffer "
                                "batches (OnlineDataModule) carry none: use target_source='teacher'")


def first_line(err: BaseException) -> str:
    """The first line of ``str(err)``, stripped (``""`` when it has none): for one-line messages."""
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def described(err: BaseException, limit: int | None = None) -> str:
    """``"TypeName: first line"`` of ``err`` (its type alone when it has no text), the line cut to ``limit``
    characters with ``...`` when given: for naming an unexpected error in one line."""
    line = first_line(err)
    if limit is not None and len(line) > limit:
        line = line[: limit - 3] + "..."
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def refuse_unpickling(weights_only: object, loader: str) -> None:
    """One line unless ``weights_only`` is ``True`` or ``None``: this library never unpickles a file. ``loader``
    says what loads, e.g. ``"zskd fit loads --ckpt_path"``."""
    if weights_only is not True and weights_only is not None:
        raise InvalidArgument(f"{loader} without unpickling (weights_only=True); got weights_only={weights_only!r}: "
                              "leave it out")
