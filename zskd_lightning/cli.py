"""The ``zskd`` command: LightningCLI with ``synthesize`` and ``record`` subcommands.

``zskd fit|validate|test|predict|synthesize|record --config FILE.yaml``. Model and data are given in subclass
mode (``class_path``/``init_args``), so one CLI trains teachers (:class:`~zskd_lightning.ClassifierModule`)
and distils students (:class:`~zskd_lightning.DistillationModule`) on real data or on impressions.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import sys
from argparse import ArgumentError
from collections.abc import Iterator
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from zskd_lightning.data.evaluation import EvaluationData
from zskd_lightning.errors import RankSharedError, ZSKDError, refuse_unpickling
from zskd_lightning.files import resolve_packaged
from zskd_lightning.impressions import ImpressionDataModule, ImpressionSynthesis
from zskd_lightning.metadata.record import ActivationRecorder
from zskd_lightning.ranks import close_process_group


class ZSKDTrainer(L.Trainer):
    """A Lightning ``Trainer`` with ``synthesize`` and ``record`` methods (the ``zskd synthesize`` and ``zskd
    record`` subcommands); ``fit`` is Lightning's own (the impression data asks for its synthesis callback
    through the LightningModule's ``configure_callbacks``)."""

    def synthesize(self, model: L.LightningModule, datamodule: L.LightningDataModule) -> None:
        """Only synthesize the datamodule's impressions into its cache, on every device of this Trainer, then stop.

        A later ``zskd fit`` with the same data settings reuses the cache without recomputation.
        """
        if not isinstance(datamodule, ImpressionDataModule):
            raise ZSKDError(f"`zskd synthesize` needs an ImpressionDataModule as data, got {type(datamodule).__name__}")
        self.limit_train_batches = 0  # run the fit setup and on_fit_start (where synthesis happens), train nothing
        self.num_sanity_val_steps = 0
        if not any(isinstance(callback, ImpressionSynthesis) for callback in self.callbacks):
            self.callbacks.append(ImpressionSynthesis())  # for a model that does not ask for it itself
        self.fit(model, datamodule=datamodule)

    def record(self, model: L.LightningModule, datamodule: L.LightningDataModule) -> None:
        """Record the teacher's per-class activation statistics over the data's training split (Lopes 2017)."""
        if not isinstance(model, ActivationRecorder):
            raise ZSKDError(f"`zskd record` needs an ActivationRecorder as model, got {type(model).__name__}")
        self.validate(model, datamodule=TrainingSplitInOrder(datamodule))


class TrainingSplitInOrder(EvaluationData):
    """A datamodule's training split served as validation data, in order (statistics need no shuffling), each
    sample on one rank, batched by its training loader's ``collate_fn``. Lightning runs the wrapped datamodule's
    ``prepare_data`` (downloads: on one process per node, the others wait) before ``setup`` reads the files in
    every process. The wrapped datamodule's batch hooks (``on_after_batch_transfer``: training augmentation) do
    not run: the teacher sees the samples as its dataset gives them."""

    def __init__(self, datamodule: L.LightningDataModule) -> None:
        super().__init__(dataset=None, batch_size=1)
        self.inner = datamodule
        self.prepare_data_per_node = datamodule.prepare_data_per_node  # Lightning reads it from this wrapper

    def prepare_data(self) -> None:
        self.inner.prepare_data()

    def setup(self, stage: str) -> None:
        self.inner.setup("fit")  # not attached to the Trainer: its fit-time switches (validation off) stay out
        train = self.inner.train_dataloader()
        self.dataset, self.batch_size, self.num_workers = train.dataset, train.batch_size, train.num_workers
        self.collate_fn = train.collate_fn


class ZSKDCLI(LightningCLI):
    """LightningCLI plus ``synthesize``, ``record`` and the ``--test_after_fit`` flag (test the last-epoch model on the test split)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        commands = LightningCLI.subcommands()
        commands["synthesize"] = {"model", "datamodule"}
        commands["record"] = {"model", "datamodule"}
        return commands

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After `fit`, run `test` with the final (last-epoch) weights. Read by `fit` only; the other "
                 "subcommands accept and ignore it, so that one config serves them all.",
        )

    def before_instantiate_classes(self) -> None:
        """``zskd record`` without ``trainer.default_root_dir`` works in the metadata file's folder, so the
        config.yaml Lightning saves (there, when the logger is off) lands beside the metadata, not in the cwd."""
        if self.subcommand == "record":
            config = self.config["record"]
            output = config["model"].get("init_args", {}).get("output")  # the recorder's default filled in
            if output is not None and config["trainer"].get("default_root_dir") is None:
                config["trainer"]["default_root_dir"] = os.path.dirname(str(output)) or "."

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        """Lightning's keyword arguments for the subcommand, with ``weights_only=True``: a ``--ckpt_path`` is loaded
        without running code from the file (``weights_only: false`` is refused in one line: this library never
        unpickles a file)."""
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        refuse_unpickling(kwargs.get("weights_only"), f"zskd {subcommand} loads --ckpt_path")
        if "weights_only" in kwargs:
            kwargs["weights_only"] = True
        return kwargs

    def _run_subcommand(self, subcommand: str) -> None:
        """Run it; if it fails, remove the log folder it made when that holds only what the CLI and the logger
        wrote at the start (config, hyper-parameters, an empty event file), so failed runs leave no version_N."""
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if self.trainer.is_global_zero:
                _remove_if_only_startup_files(_run_log_folder(self.trainer))
            raise

    def after_fit(self) -> None:
        if self.config["fit"].get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``zskd`` console script. Bad input ends with one line on stderr and exit code 2.

    An argument naming a packaged file (``zskd_lightning:configs/quickstart.yaml``) is resolved to the installed
    package's copy, so the quickstart runs from any folder.
    """
    if args is None:  # the console script: resolve in sys.argv itself (LightningCLI warns when given both)
        sys.argv[1:] = [_resolve_argument(arg) for arg in sys.argv[1:]]
    else:
        args = [_resolve_argument(arg) for arg in args]
    try:
        with _concise_subclass_lists():
            ZSKDCLI(
                model_class=L.LightningModule,
                datamodule_class=L.LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                trainer_class=ZSKDTrainer,
                save_config_kwargs={"overwrite": True},
                auto_configure_optimizers=False,
                parser_kwargs={"exit_on_error": False, "description": DESCRIPTION, **SUBCOMMAND_HELP},
                args=args,
            )
        close_process_group()
    except ArgumentError as err:  # unknown key, wrong type, missing file: jsonargparse's message, shortened
        print(f"zskd: error: {_one_line(str(err))}", file=sys.stderr)
        sys.exit(2)
    except pickle.UnpicklingError as err:  # a --ckpt_path holding pickled objects: refused, nothing of it ran
        print(f"zskd: error: the checkpoint holds pickled Python objects, which are never loaded (they could run "
              f"code): {_one_line(str(err), 200)}; re-save only its tensors and hyper-parameters", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        cause = _zskd_error_in_chain(err)
        if cause is None:
            raise
        if not (isinstance(cause, RankSharedError) and rank_zero_only.rank != 0):  # every rank has it: say it once
            print(f"zskd: error: {cause}", file=sys.stderr)
        sys.exit(2)


DESCRIPTION = (
    "zskd-lightning: data-free knowledge distillation. Synthesize impressions from a frozen teacher and distil a "
    "student on them (fit), or train a teacher on real data. Quickstart: "
    "zskd fit --config zskd_lightning:configs/quickstart.yaml"
)
SUBCOMMAND_HELP = {
    "fit": {"description": "Train: with an ImpressionDataModule, first synthesize the missing impressions into its "
                           "cache (on every device), then distil the student; with real data, train the model."},
    "validate": {"description": "One evaluation epoch on the validation data (held-out impressions of a complete "
                                "cache, or a real validation split)."},
    "test": {"description": "One evaluation epoch on the test split (eval_data's real test set)."},
    "predict": {"description": "Label inputs (predict_data, else eval_data's test split) and write the "
                               "probabilities to predictions.npz in the run's log folder."},
}

#: Modules whose classes ``--help`` lists for an ``nn.Module`` argument (torch alone has hundreds).
_LISTED_MODULES = ("zskd_lightning.models.", "zskd_lightning.FrozenTeacher")


@contextlib.contextmanager
def _concise_subclass_lists() -> Iterator[None]:
    """While the CLI runs, help for an argument typed ``nn.Module`` lists this library's classes, not every
    ``torch.nn`` layer (1,300 of 1,400 lines of ``--model.help DistillationModule``); any class_path still works."""
    try:
        from jsonargparse._typehints import ActionTypeHint
    except ImportError:  # pragma: no cover - private module moved: keep jsonargparse's full lists
        yield
        return
    original = ActionTypeHint.extra_help
    prefix = ", known subclasses: "

    def extra_help(action: Any) -> str:
        text = original(action)
        if not text.startswith(prefix):
            return text
        paths = text[len(prefix):].split(", ")
        listed = [p for p in paths if p.startswith(_LISTED_MODULES)]
        if len(paths) - len(listed) < 20:
            return text
        shown = ", ".join(listed) + ", " if listed else ""
        return f"{prefix}{shown}and {len(paths) - len(listed)} classes of torch and other packages (any class_path)"

    ActionTypeHint.extra_help = extra_help
    try:
        yield
    finally:
        ActionTypeHint.extra_help = original


#: What a run writes into its log folder before any work: LightningCLI's config, the logger's hyper-parameters
#: and (TensorBoard) an event file.
_STARTUP_FILES = re.compile(r"^(config\.yaml|hparams\.yaml|events\.out\.tfevents\..*)$")


def _run_log_folder(trainer: L.Trainer) -> str | None:
    """The version folder (``.../version_N``) a TensorBoard or CSV logger makes for this run, as this process
    sees it (not ``trainer.log_dir``: a collective the other ranks may never reach on a failure path); ``None``
    without such a logger, whose folder (``default_root_dir``, a ``save_dir``) is the user's own."""
    logger = trainer.loggers[0] if trainer.loggers else None
    return logger.log_dir if isinstance(logger, (TensorBoardLogger, CSVLogger)) else None


def _remove_if_only_startup_files(folder: str | None) -> None:
    """Delete ``folder`` if it holds nothing but :data:`_STARTUP_FILES` with nothing logged in them: no
    checkpoint, metric, export, or event file holding a value (:func:`_event_file_holds_values`)."""
    if not folder or not os.path.isdir(folder):
        return
    names = os.listdir(folder)
    paths = [os.path.join(folder, name) for name in names]
    if names and all(_STARTUP_FILES.match(name) and os.path.isfile(path)
                     and not (name.startswith("events.") and _event_file_holds_values(path))
                     for name, path in zip(names, paths)):
        for name in names:
            os.remove(os.path.join(folder, name))
        os.rmdir(folder)


#: What a TensorBoard logger writes at a run's start: Lightning's placeholder metric, and hyper-parameters.
_STARTUP_TAGS = {"hp_metric"}


def _event_file_holds_values(path: str) -> bool:
    """Whether the TensorBoard event file at ``path`` holds anything a run logged (a scalar, an image, ...),
    beyond its version record, the hyper-parameters and Lightning's ``hp_metric`` placeholder. ``True`` for a
    file that does not read whole as event records (e.g. cut by a crash): what cannot be judged is kept."""
    # Imported here, on the failure path only: the reader costs every `zskd` call about 0.1 s at start-up.
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event

    size = os.path.getsize(path)
    if size > 1 << 20:
        return True
    read = 0
    try:
        for record in RawEventFileLoader(path).Load():
            read += len(record) + 16  # TFRecord framing: length (8), its CRC (4), the record, its CRC (4)
            event = Event.FromString(record)
            if event.HasField("file_version"):
                continue
            if not event.HasField("summary") or any(
                    value.tag not in _STARTUP_TAGS and value.metadata.plugin_data.plugin_name != "hparams"
                    for value in event.summary.value):
                return True
    except Exception:  # noqa: BLE001 - an unreadable file is kept
        return True
    return read != size


def _resolve_argument(arg: str) -> str:
    """``arg`` (``VALUE`` or ``--key=VALUE``) with a packaged path in it resolved (:func:`resolve_packaged`)."""
    key, equals, value = arg.partition("=")
    if equals and key.startswith("--"):
        return f"{key}={resolve_packaged(value)}"
    return resolve_packaged(arg)


def _zskd_error_in_chain(err: BaseException | None) -> ZSKDError | None:
    """The ZSKDError that caused ``err``, if any (jsonargparse re-raises errors from class construction)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ZSKDError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value",
          "- Expected a <class 'NoneType'>")


def _one_line(message: str, limit: int = 400) -> str:
    """jsonargparse's multi-line error as one line: the nested keys down to the innermost one, then its reasons.

    Dropped at every nesting level: the Union bookkeeping (subtypes, "Expected a NoneType"), and the echoed value.
    """
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    kept = [line.removeprefix("- ") for line in lines if not line.startswith(_NOISE)]
    text = " ".join(kept)
    return text if len(text) <= limit else text[: limit - 3] + "..."
