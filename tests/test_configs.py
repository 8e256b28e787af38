"""Every shipped config parses against the current code (class paths, argument names, types)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from zskd_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted([*(REPO / "configs").rglob("*.yaml"), *(REPO / "zskd_lightning" / "configs").glob("*.yaml")])
#: Variant files that change one thing of a full config, given after it (``--config BASE --config VARIANT``).
OVERLAY_BASES = {"lopes": REPO / "configs" / "mnist" / "lopes_lenet5_half.yaml",
                 "ssdkd": REPO / "configs" / "mnist" / "ssdkd_lenet5_half.yaml",
                 "online": REPO / "configs" / "cifar10" / "fast_alexnet_half.yaml",
                 "wang": REPO / "configs" / "mnist" / "wang_lenet5_half.yaml",
                 "zskd": REPO / "configs" / "mnist" / "zskd_lenet5_half_fast.yaml"}


def _arguments(config: Path) -> tuple[list[str], dict]:
    """The ``--config`` arguments that run ``config`` and the merged source (base first, for overlays)."""
    base = OVERLAY_BASES.get(config.parent.name)
    source = yaml.safe_load(config.read_text())
    if base is None:
        return ["--config", str(config)], source
    merged = yaml.safe_load(base.read_text())
    return ["--config", str(base), "--config", str(config)], merged


def test_configs_are_shipped():
    names = {p.relative_to(p.parents[1]).as_posix() if p.parent.name != "configs" else p.name for p in CONFIGS}
    for expected in (
        "quickstart.yaml",
        "digits/teacher.yaml",
        "mnist/teacher_lenet5.yaml",
        "mnist/student_ce_lenet5_half.yaml",
        "mnist/kd_real_lenet5_half.yaml",
        "mnist/zskd_lenet5_half.yaml",
        "mnist/zskd_lenet5_half_fast.yaml",
        "mnist/ci_lenet5_half.yaml",
        "cifar10/teacher_alexnet.yaml",
        "cifar10/student_ce_alexnet_half.yaml",
        "cifar10/kd_real_alexnet_half.yaml",
        "mnist/wang_lenet5_half.yaml",
        "cifar10/wang_alexnet_half.yaml",
        "mnist/lopes_record.yaml",
        "mnist/lopes_lenet5_half.yaml",
        "lopes/top_layer.yaml",
        "lopes/all_layers.yaml",
        "lopes/spectral_all_layers.yaml",
        "lopes/fast.yaml",
        "mnist/fast_lenet5_half.yaml",
        "cifar10/fast_alexnet_half.yaml",
        "cifar10/zskd_alexnet_half.yaml",
        "cifar10/ci_alexnet_half.yaml",
        "cifar10/ssdkd_alexnet_half.yaml",
        "mnist/ssdkd_lenet5_half.yaml",
        "ssdkd/no_phi.yaml",
        "ssdkd/priority.yaml",
        "ssdkd/epochs60.yaml",
        "wang/iterations900.yaml",
        "wang/epochs240.yaml",
        "wang/lr3e-3.yaml",
        "wang/iterations1500.yaml",
        "zskd/jitter2.yaml",
        "online/cpu_budget.yaml",
        "online/cpu_session.yaml",
        "online/fomaml.yaml",
        "online/bn_memory.yaml",
    ):
        assert expected in names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.relative_to(p.parents[1]).as_posix())
def test_config_parses(config, capsys):
    arguments, source = _arguments(config)
    subcommand = "record" if source["model"]["class_path"].endswith("ActivationRecorder") else "fit"
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, *arguments, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == source["model"]["class_path"]
    assert printed["data"]["class_path"] == source["data"]["class_path"]
    if "seed_everything" in source:
        assert printed["seed_everything"] == source["seed_everything"]
    if config.parent.name in OVERLAY_BASES:  # every setting of the variant wins over the base's
        lost = _not_in(printed, yaml.safe_load(config.read_text()))
        assert not lost, f"{config.name}: the printed config lacks the overlay's {lost}"


def _not_in(printed, wanted, path: str = "") -> list[str]:
    """The paths of ``wanted`` (an overlay) whose value ``printed`` (the parsed, merged config) does not hold:
    mappings compare key by key (``printed`` may hold more: defaults), lists item by item, class paths by class
    name (the CLI writes the module it resolved), numbers by value (YAML reads ``3e-3`` as a string)."""
    if isinstance(wanted, dict):
        if not isinstance(printed, dict):
            return [path or "."]
        return [lost for key, value in wanted.items() for lost in _not_in(printed.get(key, _ABSENT), value,
                                                                            f"{path}.{key}")]
    if isinstance(wanted, list):
        if not isinstance(printed, list) or len(printed) != len(wanted):
            return [path]
        return [lost for i, (got, value) in enumerate(zip(printed, wanted)) for lost in _not_in(got, value,
                                                                                                 f"{path}[{i}]")]
    if path.endswith("class_path") and isinstance(printed, str) and isinstance(wanted, str):
        return [] if printed.rsplit(".", 1)[-1] == wanted.rsplit(".", 1)[-1] else [path]
    try:
        same = not isinstance(printed, bool) and float(printed) == float(wanted)
    except (TypeError, ValueError):
        same = False
    return [] if same or printed == wanted else [path]


_ABSENT = object()


def _last_checkpoint_args(config: Path) -> list[dict]:
    """``init_args`` of the config's ModelCheckpoint callbacks that write ``last.ckpt``."""
    callbacks = (yaml.safe_load(config.read_text()).get("trainer") or {}).get("callbacks") or []
    return [c["init_args"] for c in callbacks if c["class_path"].endswith("ModelCheckpoint")
            and (c["init_args"].get("save_last") or c["init_args"].get("filename") == "last")]


#: Configs whose ModelCheckpoint writes ``last.ckpt`` (the teachers every distillation config loads, among others).
LAST_CHECKPOINT_CONFIGS = [config for config in CONFIGS if _last_checkpoint_args(config)]


def test_every_teacher_config_writes_a_last_checkpoint():
    teachers = [config for config in CONFIGS if config.name.startswith("teacher")]
    assert len(teachers) >= 3 and set(teachers) <= set(LAST_CHECKPOINT_CONFIGS)


@pytest.mark.parametrize("config", LAST_CHECKPOINT_CONFIGS, ids=lambda p: p.relative_to(p.parents[1]).as_posix())
def test_a_configs_last_checkpoint_is_written_every_epoch_and_overwritten(config):
    """Checkpoints other configs load (``last.ckpt``) are written after every epoch (nothing lost on a crash:
    Lightning 2.6 writes a ``save_last`` copy only when it saves another checkpoint, so ``save_top_k: 0`` wrote
    it at the end of fit only) and overwritten on a re-run, never versioned to ``last-v1.ckpt``."""
    for args in _last_checkpoint_args(config):
        assert args.get("enable_version_counter") is False, config
        assert args.get("save_top_k", 1) != 0, config


def test_the_teacher_configs_checkpoint_survives_a_crash_and_resumes(tmp_path):
    """The MNIST teacher config's checkpoint callback, on a tiny digits run that dies in its second epoch: the
    first epoch's ``last.ckpt`` is on disk, and fitting from it finishes the run."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from zskd_lightning import ClassifierModule
    from zskd_lightning.data import DigitsDataModule
    from zskd_lightning.models import DigitsConvNetHalf

    (args,) = _last_checkpoint_args(REPO / "configs" / "mnist" / "teacher_lenet5.yaml")

    class DieInSecondEpoch(Callback):
        def on_train_batch_start(self, trainer, *_):
            if trainer.current_epoch == 1:
                raise RuntimeError("the machine died")

    def trainer(*callbacks) -> L.Trainer:
        return L.Trainer(max_epochs=2, accelerator="cpu", limit_train_batches=3, limit_val_batches=2,
                         num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
                         logger=False, default_root_dir=tmp_path,
                         callbacks=[ModelCheckpoint(**{**args, "dirpath": tmp_path / "ckpt"}), *callbacks])

    def fit(run: L.Trainer, ckpt_path=None) -> None:
        L.seed_everything(0)
        run.fit(ClassifierModule(network=DigitsConvNetHalf(in_channels=1, num_classes=10)),
                datamodule=DigitsDataModule(batch_size=32), ckpt_path=ckpt_path)

    with pytest.raises(RuntimeError, match="the machine died"):
        fit(trainer(DieInSecondEpoch()))
    last = tmp_path / "ckpt" / "last.ckpt"
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]
    assert torch.load(last, weights_only=True)["epoch"] == 0  # the finished first epoch
    resumed = trainer()
    fit(resumed, ckpt_path=str(last))
    assert resumed.current_epoch == 2 and torch.load(last, weights_only=True)["epoch"] == 1


def test_data_free_configs_of_batchnorm_teachers_use_the_batchnorm_prior():
    """CIFAR-10's AlexNet teacher has BatchNorm: its impression configs add BatchNormStatistics, at the documented
    default weight (README, "The BatchNorm prior") or at a weight chosen on validation that the header states."""
    from zskd_lightning.synthesis import BatchNormStatistics

    default = BatchNormStatistics().weight
    checked = 0
    for config in CONFIGS:
        source = yaml.safe_load(config.read_text())
        if config.parent.name in OVERLAY_BASES:  # an overlay: its base is walked on its own
            continue
        if "cifar10" not in config.parts or not source["data"]["class_path"].endswith("ImpressionDataModule"):
            continue
        regularizers = source["data"]["init_args"]["synthesizer"]["init_args"].get("regularizers") or []
        priors = [r for r in regularizers if r["class_path"].endswith("BatchNormStatistics")]
        assert priors, config
        weight = (priors[0].get("init_args") or {}).get("weight", default)
        header = " ".join(line.lstrip("#").strip() for line in config.read_text().splitlines() if line.startswith("#"))
        assert weight == default or f"BatchNorm prior {weight}" in header, (config, weight)
        checked += 1
    assert checked >= 1


def test_the_readme_names_every_config():
    """The README's "Configs" table names each shipped config: by path, by its folder (``configs/x/y/*.yaml``)
    or by its path under its dataset's folder (``online/fomaml.yaml``)."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Configs\n", 1)[1].split("\n## ", 1)[0]
    unnamed = []
    for config in sorted((REPO / "configs").rglob("*.yaml")):
        path = config.relative_to(REPO)
        names = {path.as_posix(), (path.parent / "*.yaml").as_posix(), "/".join(path.parts[2:])}
        if not any(f"`{name}`" in section for name in names):
            unnamed.append(path.as_posix())
    assert not unnamed, f"configs missing from the README's Configs table: {unnamed}"
