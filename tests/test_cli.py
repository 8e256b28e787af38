"""The ``zskd`` console command, end to end on digits (CPU, tiny budgets).

Each CLI process spends most of its ~5 s importing torch/lightning, so the seven console runs are started
concurrently by one module fixture; the tests then inspect their results. Cheaper behaviours
call ``zskd_lightning.cli.main`` in-process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import lightning as L
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from helpers import tiny

from zskd_lightning import DistillationModule, ModulatingFunction, PrioritySampler, load_student
from zskd_lightning.cli import _run_log_folder, main
from zskd_lightning.models import DigitsConvNetHalf
from zskd_lightning.synthesis import PixelL2Prior

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TIMEOUT_S = 300
DIGITS_HALF = "zskd_lightning.models.DigitsConvNetHalf"


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("PL_GLOBAL_SEED", None)
    return subprocess.Popen(
        tiny.zskd_command() + args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{proc.args} ran past {TIMEOUT_S}s:\n{err[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _dump(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _kd_config(teacher_init_args: dict[str, Any], student: str = DIGITS_HALF, **student_init: Any) -> dict[str, Any]:
    return {
        "seed_everything": 0,
        "test_after_fit": True,
        "trainer": {
            "max_epochs": 1,
            "accelerator": "cpu",
            "devices": 1,
            "limit_train_batches": 2,
            "limit_val_batches": 2,
            "limit_test_batches": 2,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": "kd_runs",
        },
        "model": {
            "class_path": "zskd_lightning.DistillationModule",
            "init_args": {
                "teacher": {"class_path": "zskd_lightning.FrozenTeacher", "init_args": teacher_init_args},
                "student": {
                    "class_path": student,
                    "init_args": {"in_channels": 1, "num_classes": 10, **student_init},
                },
                "temperature": 4.0,
            },
        },
        "data": {"class_path": "zskd_lightning.data.DigitsDataModule", "init_args": {"batch_size": 32}},
    }


def _tiny_fit_config(classifier_config) -> dict[str, Any]:
    config = classifier_config(
        "runs",
        logger={
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": "logs", "name": "tiny", "version": "run"},
        },
    )
    config["seed_everything"] = True  # the CLI must record the seed it drew, as an int
    return config


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, classifier_config) -> dict[str, Any]:
    """Seven console runs, overlapped: the teacher fit and the four bad-input cases start together; the
    distillation from the fitted teacher and ``zskd test`` start as soon as the teacher checkpoint exists."""
    work = tmp_path_factory.mktemp("cli")
    _dump(work / "tiny.yaml", _tiny_fit_config(classifier_config))
    network_teacher = {"network": {"class_path": DIGITS_HALF, "init_args": {"num_classes": 10}}}
    bad = {
        "missing_teacher": _kd_config({"checkpoint": "missing_teacher.ckpt"}),
        "num_classes": _kd_config(network_teacher, num_classes=5),
        "input_shape": _kd_config(network_teacher, student="zskd_lightning.models.LeNet5Half"),
        "unknown_key": _kd_config(network_teacher),
    }
    bad["unknown_key"]["model"]["init_args"]["not_a_key"] = 1
    for name, config in bad.items():
        config["trainer"]["default_root_dir"] = f"{name}_runs"
        _dump(work / f"{name}.yaml", config)

    procs = {"fit": _start(["fit", "--config", "tiny.yaml"], work)}
    try:
        procs.update({name: _start(["fit", "--config", f"{name}.yaml"], work) for name in bad})
        results = {"fit": _finish(procs.pop("fit"))}
        assert results["fit"].returncode == 0, f"zskd fit failed:\n{results['fit'].stderr[-3000:]}"
        log_dir = work / "logs" / "tiny" / "run"
        shutil.copy(log_dir / "checkpoints" / "last.ckpt", work / "teacher.ckpt")
        _dump(work / "kd.yaml", _kd_config({"checkpoint": "teacher.ckpt"}))
        procs["distill"] = _start(["fit", "--config", "kd.yaml"], work)
        procs["test"] = _start(
            ["test", "--config", "tiny.yaml", "--ckpt_path", "teacher.ckpt", "--trainer.logger", "false"], work
        )
        results.update({name: _finish(proc) for name, proc in procs.items()})
    finally:
        for proc in procs.values():  # only on failure: stop what this fixture started
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    results["work"] = work
    results["log_dir"] = log_dir
    return results


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"{result.args} exited {result.returncode}:\n{result.stderr[-3000:]}"


def _assert_clean_error(result: subprocess.CompletedProcess, *needles: str, max_lines: int = 10) -> str:
    """Non-zero exit (2), no traceback, a short error message on stderr that contains every needle."""
    stderr = result.stderr
    assert "Traceback" not in stderr, f"{result.args} printed a traceback:\n{stderr[-1500:]}"
    assert result.returncode == 2, f"exit code {result.returncode}:\n{stderr[-2000:]}"
    lines = [line for line in stderr.splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.startswith(("zskd: error:", "error:"))]
    assert starts, f"no error line on stderr:\n{stderr[-2000:]}"
    message = lines[starts[-1] :]
    assert len(message) <= max_lines, "\n".join(message)
    text = "\n".join(message)
    for needle in needles:
        assert needle in text, f"{needle!r} not in the error message:\n{text}"
    return text


# ---------------------------------------------------------------------------------------- good runs
def test_fit_writes_config_with_int_seed(cli_runs):
    _ok(cli_runs["fit"])
    config = yaml.safe_load((cli_runs["log_dir"] / "config.yaml").read_text())
    seed = config["seed_everything"]
    assert isinstance(seed, int) and not isinstance(seed, bool), seed
    assert config["model"]["class_path"] == "zskd_lightning.ClassifierModule"
    assert config["model"]["init_args"]["network"]["class_path"] == DIGITS_HALF
    assert (cli_runs["log_dir"] / "metrics.csv").is_file()


def test_fit_again_into_same_log_folder(cli_runs, monkeypatch):
    """The same ``zskd fit`` again (in-process) into the same log folder: no "config.yaml exists" crash."""
    first = (cli_runs["log_dir"] / "config.yaml").read_text()
    monkeypatch.chdir(cli_runs["work"])
    monkeypatch.setattr(sys, "argv", ["zskd"])
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    main(["fit", "--config", "tiny.yaml"])  # raises on any failure
    assert [p.name for p in cli_runs["log_dir"].parent.iterdir()] == ["run"]  # really the same folder
    second = yaml.safe_load((cli_runs["log_dir"] / "config.yaml").read_text())
    assert isinstance(second["seed_everything"], int)
    assert second["model"] == yaml.safe_load(first)["model"]


def test_distill_from_cli_teacher_checkpoint(cli_runs):
    result = cli_runs["distill"]
    _ok(result)
    log_dirs = sorted((cli_runs["work"] / "kd_runs" / "lightning_logs").iterdir())  # test_after_fit: same one
    assert len(log_dirs) == 1
    assert (log_dirs[0] / "student.safetensors").is_file() and (log_dirs[0] / "student.json").is_file()
    config = yaml.safe_load((log_dirs[0] / "config.yaml").read_text())
    teacher = config["model"]["init_args"]["teacher"]
    assert teacher["class_path"] == "zskd_lightning.FrozenTeacher"
    assert teacher["init_args"]["checkpoint"] == "teacher.ckpt"
    assert "test/agreement" in result.stdout and "test/acc" in result.stdout  # test_after_fit


def test_the_exported_student_loads_in_one_call(cli_runs):
    """The record beside the weights names the architecture (from the config), the input and the test accuracy."""
    log_dir = next((cli_runs["work"] / "kd_runs" / "lightning_logs").iterdir())
    student = load_student(log_dir / "student.safetensors")
    record = student.zskd_record
    assert isinstance(student, DigitsConvNetHalf) and not student.training
    assert record["init_args"] == {"in_channels": 1, "num_classes": 10}
    assert record["input_shape"] == [1, 8, 8] and record["num_classes"] == 10
    assert record["input_mean"] and record["input_std"]
    assert record["teacher"]["checkpoint"] == "teacher.ckpt" and len(record["teacher"]["fingerprint"]) == 64
    printed = re.search(r"test/acc\W+([0-9.]+)", cli_runs["distill"].stdout)  # test_after_fit wrote it in
    assert printed and abs(record["test_accuracy"] - 100 * float(printed.group(1))) < 1e-3


def test_a_cli_checkpoint_holds_the_teacher_by_reference_and_loads_alone(cli_runs, monkeypatch):
    log_dir = next((cli_runs["work"] / "kd_runs" / "lightning_logs").iterdir())
    checkpoint = next((log_dir / "checkpoints").glob("*.ckpt"))
    content = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert not [k for k in content["state_dict"] if k.startswith("teacher.")]
    assert content["zskd_teacher"]["checkpoint"] == "teacher.ckpt"
    monkeypatch.chdir(cli_runs["work"])  # the teacher's path is relative to where the run ran
    restored = DistillationModule.load_from_checkpoint(checkpoint)  # nothing else needed
    exported = load_student(log_dir / "student.safetensors")
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(restored.eval()(x), exported(x))  # the last epoch's checkpoint = the exported student


def test_a_module_loaded_from_a_cli_checkpoint_keeps_the_network_specs(cli_runs, monkeypatch, tmp_path):
    """Lightning rebuilds a loaded module outside the CLI, where save_hyperparameters sees network objects: the
    specs were dropped, so the loaded module's export needed `network` and its own checkpoint did not load alone
    ("built in Python"). The specs are recorded again."""
    log_dir = next((cli_runs["work"] / "kd_runs" / "lightning_logs").iterdir())
    checkpoint = next((log_dir / "checkpoints").glob("*.ckpt"))
    monkeypatch.chdir(cli_runs["work"])
    restored = DistillationModule.load_from_checkpoint(checkpoint)
    content = torch.load(checkpoint, map_location="cpu", weights_only=True)
    for name in ("teacher", "student"):
        assert restored.hparams[name] == content["hyper_parameters"][name]
    exported = load_student(restored.export_student(tmp_path / "again.safetensors"))  # no `network` needed
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(exported(x), restored.eval()(x))
    torch.save({**content, "hyper_parameters": dict(restored.hparams)}, tmp_path / "again.ckpt")  # as a save would
    again = DistillationModule.load_from_checkpoint(tmp_path / "again.ckpt")
    with torch.no_grad():
        assert torch.equal(again.eval()(x), restored(x))


def test_a_classifier_loaded_from_a_cli_checkpoint_keeps_its_network_spec(cli_runs, tmp_path):
    """As for DistillationModule: a teacher module loaded outside the CLI dropped its `network` spec, so a
    checkpoint it saved (e.g. after fine-tuning) no longer served as a teacher, nor loaded alone."""
    from zskd_lightning import ClassifierModule, FrozenTeacher

    checkpoint = cli_runs["work"] / "teacher.ckpt"
    content = torch.load(checkpoint, map_location="cpu", weights_only=True)
    module = ClassifierModule.load_from_checkpoint(checkpoint)
    assert module.hparams["network"] == content["hyper_parameters"]["network"]
    torch.save({**content, "hyper_parameters": dict(module.hparams)}, tmp_path / "again.ckpt")  # as a save would
    teacher = FrozenTeacher(checkpoint=str(tmp_path / "again.ckpt"))  # no `network` given
    again = ClassifierModule.load_from_checkpoint(tmp_path / "again.ckpt")
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(teacher(x), module.eval()(x), atol=1e-5)
        assert torch.equal(again.eval()(x), module(x))


def test_zskd_test_subcommand(cli_runs):
    result = cli_runs["test"]
    _ok(result)
    match = re.search(r"test/acc\W+([0-9.]+)", result.stdout)
    assert match, result.stdout
    # the checkpoint's weights were tested: the same figure in this process (an untrained model would differ)
    from zskd_lightning import ClassifierModule
    from zskd_lightning.data import DigitsDataModule

    module = ClassifierModule.load_from_checkpoint(cli_runs["work"] / "teacher.ckpt", weights_only=True)
    (metrics,) = tiny.quiet_trainer(cli_runs["work"]).test(module, datamodule=DigitsDataModule(), verbose=False)
    assert abs(float(match.group(1)) - metrics["test/acc"]) < 1e-6


def test_print_config_in_process(write_yaml, classifier_config, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["zskd"])
    path = write_yaml(classifier_config(tmp_path / "runs"), "tiny.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "zskd_lightning.ClassifierModule"
    assert printed["model"]["init_args"]["network"]["class_path"] == DIGITS_HALF
    assert printed["data"]["class_path"] == "zskd_lightning.data.DigitsDataModule"
    assert not (tmp_path / "runs").exists()  # printing the config trains nothing


def test_weights_only_false_on_the_command_line_is_refused_in_one_line(write_yaml, classifier_config, tmp_path,
                                                                       capsys, monkeypatch):
    """`--weights_only false` reached Trainer.fit, which unpickles --ckpt_path (code in the file would run)."""
    monkeypatch.setattr(sys, "argv", ["zskd"])
    path = write_yaml(classifier_config(tmp_path / "runs"), "tiny.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--weights_only", "false", "--trainer.logger", "false"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "zskd: error: zskd fit loads --ckpt_path without unpickling (weights_only=True); got weights_only=False: "
        "leave it out")


# ---------------------------------------------------------------------------------------- bad input
def test_missing_teacher_checkpoint(cli_runs):
    text = _assert_clean_error(cli_runs["missing_teacher"], "missing_teacher.ckpt", max_lines=1)
    assert "not found" in text


def test_num_classes_mismatch(cli_runs):
    text = _assert_clean_error(cli_runs["num_classes"], "num_classes", max_lines=1)
    assert re.search(r"\b10\b", text) and re.search(r"\b5\b", text), text


def test_input_shape_the_model_cannot_take(cli_runs):
    _assert_clean_error(cli_runs["input_shape"], "LeNet5Half", "(1, 8, 8)", "(32, 32)", max_lines=1)


def test_unknown_config_key(cli_runs):
    _assert_clean_error(cli_runs["unknown_key"], "not_a_key")


def test_main_exits_2_with_one_line_in_process(write_yaml, tmp_path, capsys, monkeypatch):
    """``main`` turns a bad teacher path into ``SystemExit(2)`` and one stderr line (no exception escapes)."""
    monkeypatch.setattr(sys, "argv", ["zskd"])
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    config = _kd_config({"checkpoint": str(tmp_path / "absent.ckpt")})
    config["trainer"]["default_root_dir"] = str(tmp_path / "kd_runs")
    path = write_yaml(config, "kd.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path)])
    assert exit_info.value.code == 2
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("zskd: error:")]
    assert len(err_lines) == 1 and "absent.ckpt" in err_lines[0], err_lines


def _quickstart_error(override: str, value: str, capsys, monkeypatch, *more: str) -> str:
    """stderr of ``zskd fit`` on the quickstart config with one bad override (and ``more`` arguments); asserts
    exit code 2."""
    monkeypatch.setattr(sys, "argv", ["zskd"])
    config = Path(__file__).resolve().parents[1] / "zskd_lightning" / "configs" / "quickstart.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), override, value, *more])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("rank, lines_printed", [(0, 1), (1, 0)])
def test_an_error_every_rank_raises_is_printed_by_rank_zero_only(rank, lines_printed, tmp_path, capsys, monkeypatch):
    """An unusable cache folder is found by rank 0 and raised on every rank (RankSharedError): under DDP the
    user reads it once, not once per process; every rank still exits 2."""
    monkeypatch.setattr(rank_zero_only, "rank", rank)
    monkeypatch.chdir(tmp_path)
    not_a_folder = tmp_path / "notes.txt"
    not_a_folder.write_text("mine")
    err = _quickstart_error("--data.init_args.cache_dir", str(not_a_folder), capsys, monkeypatch)
    lines = [line for line in err.splitlines() if line.startswith("zskd: error:")]
    assert len(lines) == lines_printed, err
    assert all("is a file, not a folder" in line for line in lines), lines
    assert not_a_folder.read_text() == "mine"
    if rank == 0:  # the failed run leaves no log folder behind (it held only the config it started with)
        assert not list((tmp_path / "runs" / "quickstart").glob("lightning_logs/version_*")), \
            list((tmp_path / "runs").rglob("*"))


def test_a_failed_run_without_a_logger_keeps_the_users_files(tmp_path, capsys, monkeypatch):
    """Without a logger the run's folder is ``default_root_dir``, the user's own: a failed run deletes nothing
    there, not even a config.yaml (Lightning writes the run's config over it, as it would on success). Only a
    TensorBoard or CSV logger's version folder, which the run made, is cleaned up."""
    work = tmp_path / "exp"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "config.yaml").write_text("trainer: {}\n")
    not_a_folder = tmp_path / "notes.txt"
    not_a_folder.write_text("mine")
    err = _quickstart_error("--data.init_args.cache_dir", str(not_a_folder), capsys, monkeypatch,
                            "--trainer.logger", "false", "--trainer.default_root_dir", str(work))
    assert "is a file, not a folder" in err
    assert (work / "config.yaml").is_file() and not_a_folder.read_text() == "mine"
    assert _run_log_folder(L.Trainer(logger=False, default_root_dir=work)) is None
    logged = L.Trainer(logger=TensorBoardLogger(tmp_path, name="logs"), default_root_dir=work)
    assert _run_log_folder(logged) == str(tmp_path / "logs" / "version_0")


def test_the_failure_cleanup_keeps_a_folder_with_anything_of_value(tmp_path):
    """A failed run's version folder goes only while it holds nothing but startup files with nothing logged in
    them; a checkpoint, metrics, an export, an event file holding values (however small) or one that does not
    read whole, or a sub-folder keeps it, every file in it untouched."""
    from zskd_lightning.cli import _remove_if_only_startup_files

    def events(name: str, values: int = 0) -> bytes:
        """A real TensorBoard event file: a logger's startup (hyper-parameters), then ``values`` scalars."""
        logger = TensorBoardLogger(tmp_path / "tb", name=name)
        logger.log_hyperparams({"lr": 0.001, "student": "LeNet5Half"})
        for step in range(values):
            logger.log_metrics({"synthesis/loss": 1.0 / (step + 1)}, step=step)
        logger.experiment.close()
        (path,) = (tmp_path / "tb" / name / "version_0").glob("events.out.tfevents.*")
        return path.read_bytes()

    def folder(name: str, **files: bytes) -> Path:
        path = tmp_path / name
        path.mkdir()
        for filename, content in {"config.yaml": b"trainer: {}\n", "hparams.yaml": b"{}\n", **files}.items():
            (path / filename.replace("__", ".")).write_bytes(content)
        return path

    startup = events("startup")
    startup_only = folder("startup", **{"events__out__tfevents__1__host": startup})
    _remove_if_only_startup_files(str(startup_only))
    assert not startup_only.exists()
    three_values = events("logged", values=3)
    assert len(three_values) < 4096  # smaller than the size rule that once judged event files
    for kept in (folder("ckpt", **{"last__ckpt": b"weights"}), folder("metrics", **{"metrics__csv": b"step\n0\n"}),
                 folder("export", **{"student__safetensors": b"w"}),
                 folder("events", **{"events__out__tfevents__2__host": three_values}),
                 folder("cut", **{"events__out__tfevents__3__host": startup[:-5]}),
                 folder("garbage", **{"events__out__tfevents__4__host": b"x" * 100})):
        before = {p.name: p.read_bytes() for p in kept.iterdir()}
        _remove_if_only_startup_files(str(kept))
        assert {p.name: p.read_bytes() for p in kept.iterdir()} == before, kept.name
    nested = folder("nested")
    (nested / "checkpoints").mkdir()
    _remove_if_only_startup_files(str(nested))
    assert (nested / "checkpoints").is_dir() and (nested / "config.yaml").is_file()


@pytest.mark.parametrize(("override", "value", "reason"), [
    ("--data.init_args.synthesizer.init_args.precision", "16-mixed", "Expected a typing.Literal['bf16-mixed', '32-true']"),
    ("--data.init_args.synthesizer.init_args.iterations", "many", "Expected a <class 'int'>"),
])
def test_error_deep_inside_nested_classes_names_the_key_and_the_reason(override, value, reason, capsys, monkeypatch):
    """A bad value two class levels down (data -> synthesizer -> key) still ends in one line with its reason."""
    err = _quickstart_error(override, value, capsys, monkeypatch)
    err_lines = [line for line in err.splitlines() if line.startswith("zskd: error:")]
    key = override.rsplit(".", 1)[1]
    assert len(err_lines) == 1 and f'Parser key "{key}"' in err_lines[0] and reason in err_lines[0], err_lines


@pytest.mark.parametrize(("override", "value", "reason"), [
    ("--data.init_args.synthesizer.init_args.jitter", "-1", "jitter must be >= 0 pixels, got -1"),
    ("--data.init_args.synthesizer.init_args.iterations", "0", "iterations must be >= 1, got 0"),
    ("--model.init_args.temperature", "0", "temperature must be > 0, got 0.0"),
])
def test_value_refused_by_a_constructor_ends_in_one_line(override, value, reason, capsys, monkeypatch):
    """A value of the right type that a class refuses (InvalidArgument) prints its message, not a traceback."""
    err = _quickstart_error(override, value, capsys, monkeypatch)
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("zskd: error:")] == [f"zskd: error: {reason}"]


def test_zskd_fit_runs_wang_2021_without_the_callback_in_the_config(tmp_path, monkeypatch):
    """A third method is one config away: the quickstart with Wang 2021's synthesizer, through ``zskd fit``; the
    data asks for its synthesis callback itself (the config names no callback)."""
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "zskd_lightning" / "configs" / "quickstart.yaml").read_text())
    config["trainer"].update({"max_epochs": 1, "default_root_dir": str(tmp_path / "run"), "logger": False,
                              "enable_progress_bar": False, "enable_checkpointing": False})
    assert "callbacks" not in config["trainer"]
    config["data"]["init_args"].update({
        "synthesizer": {"class_path": "zskd_lightning.WangSynthesizer",
                        "init_args": {"sigma": 1.5, "activation_weight": 0.05, "iterations": 3, "lr": 0.1}},
        "num_impressions": 40, "num_val_impressions": 8, "chunk_size": 16, "cache_dir": str(tmp_path / "cache"),
    })
    path = _dump(tmp_path / "wang.yaml", config)
    monkeypatch.setattr(sys, "argv", ["zskd"])
    with tiny.torch_threads(1):
        main(["fit", "--config", str(path)])
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["method"]["name"] == "wang2021" and manifest["num_impressions"] == 48


def test_zskd_fit_runs_an_online_config_with_its_pixel_prior(tmp_path, monkeypatch):
    """The quickstart's teacher and student with SSD-KD's online data, through ``zskd fit``: nested class_path
    entries reach the generator's terms as objects (the regularizers, the sampler, the modulating function)."""
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "zskd_lightning" / "configs" / "quickstart.yaml").read_text())
    config["trainer"].update({"max_epochs": 1, "default_root_dir": str(tmp_path / "run"), "logger": False,
                              "enable_progress_bar": False, "enable_checkpointing": False})
    config["model"]["init_args"]["sample_weights"] = {"class_path": "zskd_lightning.ModulatingFunction",
                                                      "init_args": {"gamma": 3.0}}  # the synthesizer's own phi: 2
    config["data"] = {"class_path": "zskd_lightning.OnlineDataModule", "init_args": {
        "synthesizer": {"class_path": "zskd_lightning.SSDKDSynthesizer", "init_args": {
            "classes": "teacher", "batch_size": 16, "width": 4, "noise_dim": 8, "steps_per_round": 1,
            "regularizers": [{"class_path": "zskd_lightning.synthesis.PixelL2Prior", "init_args": {"weight": 0.002}}]}},
        "buffer_size": 32, "buffer_update": "balanced", "steps_per_epoch": 4, "batch_size": 8, "warmup_rounds": 2,
        "round_every_n_steps": 2, "sampler": {"class_path": "zskd_lightning.PrioritySampler"},
        "eval_data": config["data"]["init_args"]["eval_data"]}}
    path = _dump(tmp_path / "online.yaml", config)
    monkeypatch.setattr(sys, "argv", ["zskd"])
    used = []  # (class, instance settings) of each of the three objects when it is put to work
    for cls, method, setting in ((PixelL2Prior, "__call__", lambda o: o.weight),
                                 (PrioritySampler, "draw", lambda o: o.alpha),
                                 (ModulatingFunction, "__call__", lambda o: o.difficulty.gamma)):
        def spy(self, *args, _original=getattr(cls, method), _setting=setting, **kwargs):
            used.append((type(self).__name__, _setting(self)))
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(cls, method, spy)
    with tiny.torch_threads(1):
        main(["fit", "--config", str(path)])
    assert (tmp_path / "run" / "buffer.png").exists()
    assert {("PixelL2Prior", 0.002), ("PrioritySampler", 0.6), ("ModulatingFunction", 3.0)} <= set(used)


class _Payload:
    """Pickled into a crafted checkpoint: unpickling it would create the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_ckpt_path_for_validate_is_refused_and_runs_nothing(cli_runs, tmp_path, capsys, monkeypatch):
    import torch

    marker = tmp_path / "ran"
    crafted = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "payload": _Payload(str(marker))}, crafted)
    monkeypatch.chdir(cli_runs["work"])
    monkeypatch.setattr(sys, "argv", ["zskd"])
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--config", "tiny.yaml", "--ckpt_path", str(crafted), "--trainer.logger", "false"])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("zskd: error:")]
    assert len(errors) == 1 and "pickled Python objects" in errors[0]
    assert not marker.exists()


def test_network_null_with_a_checkpoint_that_records_it(cli_runs, tmp_path, monkeypatch):
    """``network: null`` is allowed (the docs say the network is optional when the checkpoint records it)."""
    config = _kd_config({"network": None, "checkpoint": str(cli_runs["work"] / "teacher.ckpt")})
    config["trainer"].update({"default_root_dir": str(tmp_path / "runs"), "logger": False,
                              "enable_checkpointing": False})
    config["test_after_fit"] = False
    path = _dump(tmp_path / "null.yaml", config)
    monkeypatch.setattr(sys, "argv", ["zskd"])
    with tiny.torch_threads(1):
        main(["fit", "--config", str(path)])
    assert (tmp_path / "runs" / "student.safetensors").is_file()


def test_the_quickstart_runs_from_any_folder(tmp_path):
    """The README's quickstart names only packaged files: it runs from a folder outside the repository (a tiny
    budget here; the full run is the README's figure)."""
    args = ["fit", "--config", "zskd_lightning:configs/quickstart.yaml", "--trainer.max_epochs", "1",
            "--trainer.enable_progress_bar", "false", "--data.init_args.num_impressions", "40",
            "--data.init_args.num_val_impressions", "8", "--data.init_args.chunk_size", "16",
            "--data.init_args.synthesizer.init_args.iterations", "3"]
    result = subprocess.run([*tiny.zskd_command(), *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env=tiny.script_env(1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/acc" in result.stdout
    assert (tmp_path / "runs" / "quickstart" / "impressions" / "manifest.json").is_file()
    assert list((tmp_path / "runs" / "quickstart" / "lightning_logs").glob("version_*/student.safetensors"))
    # The complete cache serves `validate` (nothing synthesized again); `predict` writes its predictions.
    budget = args[3:]
    outputs = {}
    for subcommand in ("validate", "predict"):
        result = subprocess.run([*tiny.zskd_command(), subcommand, "--config", "zskd_lightning:configs/quickstart.yaml", *budget],
                                cwd=tmp_path, capture_output=True, text=True, timeout=300, env=tiny.script_env(1))
        assert result.returncode == 0, f"{subcommand}: {result.stderr[-3000:]}"
        outputs[subcommand] = result.stdout + result.stderr
        assert "Synthesizing" not in outputs[subcommand]
    assert "val/agreement" in outputs["validate"]
    written = list((tmp_path / "runs" / "quickstart" / "lightning_logs").glob("version_*/predictions.npz"))
    assert len(written) == 1, outputs["predict"][-2000:]
    predictions = np.load(written[0])
    assert predictions["probabilities"].shape[1] == 10 and len(predictions["labels"]) == len(predictions["indices"])
    assert np.allclose(predictions["probabilities"].sum(axis=1), 1.0, atol=1e-5)


def test_help_says_what_zskd_does_and_stays_short(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["zskd"])
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    top = capsys.readouterr().out
    assert "data-free knowledge distillation" in top and "quickstart" in top.lower()
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert "synthesize the missing impressions" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "DistillationModule"])
    model_help = capsys.readouterr().out
    assert len(model_help.splitlines()) < 200, len(model_help.splitlines())
    assert "zskd_lightning.models" in model_help  # the library's networks are still listed
    assert "torch.nn.Bilinear" not in model_help
