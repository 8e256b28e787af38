"""Every shipped config parses against the current code (class paths, argument names, types)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from zskd_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted([*(REPO / "configs").rglob("*.yaml"), *(REPO / "zskd_lightning" / "configs").glob("*.yaml")])
#: Variant files that change one thing of a full config, given after it (``--config BASE --config VARIANT``).
OVERLAY_BASES = {"lopes": REPO / "configs" / "mnist" / "lopes_lenet5_half.yaml",
                 "ssdkd": REPO / "configs" / "mnist" / "ssdkd_lenet5_half.yaml"}


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
        "mnist/fast_lenet5_half.yaml",
        "cifar10/fast_alexnet_half.yaml",
        "cifar10/zskd_alexnet_half.yaml",
        "cifar10/ci_alexnet_half.yaml",
        "cifar10/ssdkd_alexnet_half.yaml",
        "mnist/ssdkd_lenet5_half.yaml",
        "ssdkd/no_phi.yaml",
        "ssdkd/uniform.yaml",
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
    overlay = yaml.safe_load(config.read_text())
    if config.parent.name in OVERLAY_BASES:  # the variant's own settings win over the base's
        wanted = overlay["data"]["init_args"].get("synthesizer", {}).get("init_args", {})
        assert {k: printed["data"]["init_args"]["synthesizer"]["init_args"][k] for k in wanted} == wanted
        for key, value in overlay["data"]["init_args"].items():
            if key != "synthesizer":
                got = printed["data"]["init_args"][key]
                assert (got["class_path"] == value["class_path"]) if isinstance(value, dict) else got == value


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.relative_to(p.parents[1]).as_posix())
def test_rerunning_a_config_overwrites_its_last_checkpoint(config):
    """Checkpoints other configs load (``last.ckpt``) are overwritten on a re-run, never versioned to
    ``last-v1.ckpt`` beside a stale ``last.ckpt``."""
    callbacks = (yaml.safe_load(config.read_text()).get("trainer") or {}).get("callbacks") or []
    for callback in callbacks:
        if callback["class_path"].endswith("ModelCheckpoint") and callback["init_args"].get("save_last"):
            assert callback["init_args"].get("enable_version_counter") is False, config


def test_data_free_configs_of_batchnorm_teachers_use_the_batchnorm_prior():
    """CIFAR-10's AlexNet teacher has BatchNorm: its impression configs add BatchNormStatistics at the documented
    default weight (README, "The BatchNorm prior")."""
    from zskd_lightning.synthesis import BatchNormStatistics

    default = BatchNormStatistics().weight
    checked = 0
    for config in CONFIGS:
        source = yaml.safe_load(config.read_text())
        if "cifar10" not in config.parts or not source["data"]["class_path"].endswith("ImpressionDataModule"):
            continue
        regularizers = source["data"]["init_args"]["synthesizer"]["init_args"].get("regularizers") or []
        priors = [r for r in regularizers if r["class_path"].endswith("BatchNormStatistics")]
        assert priors and (priors[0].get("init_args") or {}).get("weight", default) == default, config
        checked += 1
    assert checked >= 1
