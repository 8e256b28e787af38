"""Recording a teacher's activation metadata (Lopes et al. 2017) over its real training split: from Python with a
plain Trainer, and through ``zskd record``."""

from __future__ import annotations

import subprocess
from pathlib import Path
import sys

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from helpers import tiny

from zskd_lightning.cli import ZSKDTrainer
from zskd_lightning import FrozenTeacher
from zskd_lightning.data import DigitsDataModule
from zskd_lightning.models import DigitsConvNet
from zskd_lightning.errors import InvalidArgument, ZSKDError
from zskd_lightning.metadata import read_metadata
from zskd_lightning.metadata.statistics import ClassMoments
from zskd_lightning.metadata.record import ActivationRecorder, default_layers
from zskd_lightning.teacher import as_frozen_teacher


def test_recording_over_the_training_split_gives_each_classs_statistics(tmp_path):
    teacher = tiny.make_net(0)
    data = DigitsDataModule(batch_size=64)
    data.setup("fit")
    recorder = ActivationRecorder(teacher, output=str(tmp_path / "meta.safetensors"), temperature=8.0,
                                  max_full_dim=100)
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False).validate(
        recorder, dataloaders=data.train_dataloader())
    metadata = read_metadata(tmp_path / "meta.safetensors", teacher_fingerprint=as_frozen_teacher(teacher).fingerprint())
    assert list(metadata.layers) == [*default_layers(teacher), "logits"] == ["body.0", "body.4", "body.6", "logits"]
    assert metadata.layers["body.0"].kept == "diagonal" and metadata.layers["body.0"].shape == (8, 8, 8)  # 512 > 100
    assert metadata.layers["logits"].kept == "full"
    # the logits' statistics equal numpy's over the same images, grouped by true class
    images, labels = data.train_dataset.images, data.train_dataset.labels
    with torch.no_grad():
        logits = (as_frozen_teacher(teacher)(images) / 8.0).double().numpy()
    record = metadata.layers["logits"]
    assert int(record.count.sum()) == len(labels)
    for k in range(10):
        rows = logits[labels.numpy() == k]
        np.testing.assert_allclose(record.mean[k].numpy(), rows.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(record.spread[k].numpy(), np.cov(rows, rowvar=False, bias=True), rtol=1e-4, atol=1e-6)


def test_a_layer_the_teacher_lacks_is_one_line():
    with pytest.raises(ZSKDError, match="no_such_layer"):
        ActivationRecorder(tiny.make_net(0), layers=["no_such_layer"])


def test_a_layer_named_logits_is_refused_in_one_line():
    """The file keeps the logits / T under "logits": a layer of that name, asked for, would be silently replaced;
    the default layers leave it out."""
    network = torch.nn.Sequential()
    network.add_module("body", torch.nn.Flatten())
    network.add_module("logits", torch.nn.Linear(64, 10))
    assert default_layers(network) == []  # its output is the logits, recorded anyway
    with pytest.raises(ZSKDError, match=r"^layer 'logits' of Sequential cannot be recorded under its name"):
        ActivationRecorder(network, layers=["logits"])


def test_a_layer_that_never_runs_is_one_line(tmp_path):
    """A module the forward never calls (a branch run only in training, or weights used through the functional
    form, as ``nn.MultiheadAttention`` does with its ``out_proj``) has no activation to record."""
    teacher = tiny.make_net(0)
    teacher.unused = torch.nn.Linear(10, 10)
    recorder = ActivationRecorder(teacher, output=str(tmp_path / "m.safetensors"))
    assert "unused" in recorder.layers
    with pytest.raises(ZSKDError, match=r"^layer\(s\) unused of TinyNet produced no activation in the forward pass"):
        _validate(tmp_path, recorder, torch.randn(4, *tiny.INPUT_SHAPE), torch.tensor([0, 1, 2, 3]))


def _validate(tmp_path, recorder: ActivationRecorder, inputs: torch.Tensor, labels: torch.Tensor) -> None:
    """Record over batches of 4 of ``inputs`` / ``labels`` with a one-process Trainer."""
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, labels), batch_size=4)
    tiny.quiet_trainer(tmp_path).validate(recorder, dataloaders=loader)


def _record_config(**init_args) -> dict:
    """A ``zskd record`` config: the shipped digits teacher over the digits training split."""
    return {
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False},
        "model": {"class_path": "zskd_lightning.metadata.record.ActivationRecorder",
                  "init_args": {"teacher": {"class_path": "zskd_lightning.FrozenTeacher", "init_args": {
                      "network": {"class_path": "zskd_lightning.models.DigitsConvNet",
                                  "init_args": {"in_channels": 1, "num_classes": 10}},
                      "checkpoint": "zskd_lightning:assets/digits_teacher.pt"}}, **init_args}},
        "data": {"class_path": "zskd_lightning.data.DigitsDataModule", "init_args": {"batch_size": 128}},
    }


def test_record_prepares_the_data_before_reading_its_training_split(tmp_path):
    """``ZSKDTrainer.record`` lets Lightning run the datamodule's ``prepare_data`` (downloads: one process per
    node, the others waiting) before ``setup`` reads the files, as fit does."""
    calls = []

    class Digits(DigitsDataModule):
        def prepare_data(self) -> None:
            calls.append("prepare_data")

        def setup(self, stage: str) -> None:
            calls.append(f"setup {stage}")
            super().setup(stage)

    output = tmp_path / "digits.metadata.safetensors"
    trainer = ZSKDTrainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, default_root_dir=tmp_path)
    teacher = FrozenTeacher(DigitsConvNet(), checkpoint=str(tiny.SHIPPED_TEACHER))
    trainer.record(ActivationRecorder(teacher, output=str(output)), Digits(batch_size=256))
    assert calls == ["prepare_data", "setup fit"]
    assert int(read_metadata(output).layers["logits"].count.sum()) > 1000


def test_zskd_record_through_the_console(tmp_path):
    """The config has no ``default_root_dir`` and its logger is off: the config.yaml Lightning saves goes beside
    the metadata file, not into the folder the command ran in."""
    config = _record_config(output="meta/digits.metadata.safetensors")
    (tmp_path / "record.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "zskd_lightning", "record", "--config", "record.yaml"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, env=tiny.script_env(1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Recorded" in result.stdout + result.stderr and "MiB" in result.stdout + result.stderr
    metadata = read_metadata(tmp_path / "meta" / "digits.metadata.safetensors")
    digits = DigitsDataModule(batch_size=128)
    digits.setup("fit")
    assert int(metadata.layers["logits"].count.sum()) == len(digits.train_dataloader().dataset)  # every image once
    assert (tmp_path / "meta" / "config.yaml").is_file() and not (tmp_path / "config.yaml").exists()


def test_two_processes_record_what_one_does(tmp_path):
    """``zskd record`` on 2 CPU processes (gloo): each rank accumulates its share, rank 0 merges and writes. The
    1,293 training images split 647 + 646, each image read once: the counts are one process's and the statistics
    too, up to the order of the float sums."""
    config = _record_config(max_full_dim=64)
    (tmp_path / "record.yaml").write_text(yaml.safe_dump(config))
    outputs = {}
    for devices in (1, 2):
        output = f"p{devices}.safetensors"
        args = [sys.executable, "-m", "zskd_lightning", "record", "--config", "record.yaml", "--trainer.devices",
                str(devices), "--model.init_args.output", output]
        if devices > 1:
            args += ["--trainer.strategy", "ddp"]
        result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=tiny.script_env(1))
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[devices] = read_metadata(tmp_path / output)
    assert set(outputs[2].layers) == set(outputs[1].layers) and len(outputs[1].layers) > 2  # hidden layers too
    for name, one in outputs[1].layers.items():
        two = outputs[2].layers[name]
        assert torch.equal(two.count, one.count) and int(one.count.sum()) == 1293, name
        torch.testing.assert_close(two.mean, one.mean, atol=1e-5 * float(one.std.max()), rtol=1e-5, msg=name)
        torch.testing.assert_close(two.spread, one.spread, atol=1e-5 * float(one.spread.abs().max()), rtol=1e-5,
                                   msg=name)


def test_a_bad_batch_on_one_rank_stops_every_rank_in_one_line(tmp_path):
    """Rank 1's samples carry a label outside the teacher's classes: it keeps going to the epoch's end, where the
    ranks decide together, rank 1 raising why and rank 0 that another rank's batches were unusable (raising alone,
    rank 1 would leave rank 0 in the statistics' gather until the process group's timeout). No file is written."""
    script = Path(__file__).parent / "helpers" / "record_run.py"
    output = tmp_path / "m.safetensors"
    proc = subprocess.run([sys.executable, str(script), "--output", str(output), "--devices", "2",
                           "--bad-label-on-rank", "1"], capture_output=True, text=True, timeout=240,
                          env=tiny.script_env(1))
    assert proc.returncode != 0 and "DONE" not in proc.stdout
    assert "ZSKDError: recording needs class labels in [0, 10) for a teacher with 10 outputs; a batch holds labels " \
           "99 to 99" in proc.stderr
    assert "ZSKDError: recording stopped: another rank's batches were unusable" in proc.stderr
    assert not output.exists()


def test_a_write_failure_on_rank_zero_stops_every_rank(tmp_path):
    """Only rank 0 writes the file: when it cannot, rank 1 must not report success (exit 0, ``DONE``)."""
    script = Path(__file__).parent / "helpers" / "record_run.py"
    (tmp_path / "a_file").write_text("not a folder")
    output = tmp_path / "a_file" / "m.safetensors"  # its folder cannot be made
    proc = subprocess.run([sys.executable, str(script), "--output", str(output), "--devices", "2"],
                          capture_output=True, text=True, timeout=240, env=tiny.script_env(1))
    assert proc.returncode != 0 and "DONE" not in proc.stdout, proc.stdout
    assert f"ZSKDError: recording not written: rank 0 could not write {output}" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("bad_label", [-1, 10])
def test_a_label_outside_the_teachers_classes_is_one_line(tmp_path, bad_label):
    """-1 (an "ignore" label) would land in the last class's statistics, 10 would fail deep in the merge."""
    recorder = ActivationRecorder(tiny.make_net(0), output=str(tmp_path / "m.safetensors"))
    labels = torch.tensor([1, 2, 4, 5, 0, 3, bad_label, 9])  # the second batch is bad: raised after the last one
    with pytest.raises(ZSKDError, match=rf"^recording needs class labels in \[0, 10\) for a teacher with 10 outputs; "
                                        rf"a batch holds labels {min(bad_label, 0)} to {max(bad_label, 9)}$"):
        _validate(tmp_path, recorder, torch.randn(8, *tiny.INPUT_SHAPE), labels)
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("bad_label", [-1, 10])
def test_class_moments_refuse_a_label_outside_their_classes(bad_label):
    """The public statistics object on its own: -1 would have indexed the last class's rows."""
    moments = ClassMoments(10, 3, "full")
    with pytest.raises(ZSKDError, match=rf"^label {bad_label} outside the statistics' classes 0..9"):
        moments.update(torch.randn(3, 3), torch.tensor([0, bad_label, 2]))
    assert int(moments.count.sum()) == 0


def test_recording_over_no_batch_is_one_line_not_a_silent_exit(tmp_path):
    data = DigitsDataModule(batch_size=64)
    data.setup("fit")
    recorder = ActivationRecorder(tiny.make_net(0), output=str(tmp_path / "meta.safetensors"))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    with pytest.raises(ZSKDError, match=r"^nothing was recorded into .*meta.safetensors: the data gave no batch"):
        trainer.validate(recorder, dataloaders=data.train_dataloader())
    assert not (tmp_path / "meta.safetensors").exists()


def test_a_failed_write_does_not_disarm_the_nothing_recorded_guard(tmp_path, monkeypatch):
    """Lightning skips the module's teardown after an error: the flag saying "this run's statistics reached the
    file" stayed set after a failed write, and the next run over no batch ended cleanly without a file."""
    import zskd_lightning.metadata.record as record

    data = DigitsDataModule(batch_size=64)
    data.setup("fit")
    recorder = ActivationRecorder(tiny.make_net(0), output=str(tmp_path / "meta.safetensors"))

    def trainer(**overrides):
        return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         **overrides)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(record, "write_metadata", full_disk)
    with pytest.raises(OSError, match="No space left"):
        trainer(limit_val_batches=1).validate(recorder, dataloaders=data.train_dataloader())
    monkeypatch.undo()
    with pytest.raises(ZSKDError, match=r"^nothing was recorded into .*meta.safetensors: the data gave no batch"):
        trainer(limit_val_batches=0).validate(recorder, dataloaders=data.train_dataloader())


@pytest.mark.parametrize("temperature", [0.0, float("inf"), float("nan")])
def test_a_temperature_that_is_not_a_positive_number_is_refused_before_recording(temperature):
    with pytest.raises(InvalidArgument, match=rf"^temperature must be > 0 and max_full_dim >= 1, got {temperature}"):
        ActivationRecorder(tiny.make_net(0), temperature=temperature)


def test_the_file_keeps_the_layers_in_recorded_order(tmp_path):
    """Order matters to the spectral objectives' chain of layers: the file does not sort the layer names
    (sorted, ``features.10`` would come before ``features.3``)."""
    data = DigitsDataModule(batch_size=256)
    data.setup("fit")
    recorder = ActivationRecorder(tiny.make_net(0), output=str(tmp_path / "m.safetensors"), layers=["body.6", "body.0"])
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False).validate(
        recorder, dataloaders=data.train_dataloader())
    assert list(read_metadata(tmp_path / "m.safetensors").layers) == ["body.6", "body.0", "logits"]


def test_a_precision_that_casts_the_teacher_is_refused_and_mixed_ones_record_in_float32(tmp_path):
    """``bf16-true`` would record bf16 statistics and a fingerprint of bf16 weights, which synthesis (float32)
    then refuses as another teacher's; ``bf16-mixed`` records with autocast off: the float32 file exactly."""
    inputs, labels = torch.randn(40, *tiny.INPUT_SHAPE), torch.arange(40) % 10
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, labels), batch_size=8)
    recorder = ActivationRecorder(tiny.make_net(0), output=str(tmp_path / "cast.safetensors"))
    with pytest.raises(ZSKDError, match=r"^Trainer precision 'bf16-true' casts the teacher's weights, and recording "
                                        r"runs it in float32"):
        tiny.quiet_trainer(tmp_path, precision="bf16-true").validate(recorder, dataloaders=loader)
    assert not (tmp_path / "cast.safetensors").exists()
    for precision in ("32-true", "bf16-mixed"):
        recorder = ActivationRecorder(tiny.make_net(0), output=str(tmp_path / f"{precision}.safetensors"))
        tiny.quiet_trainer(tmp_path, precision=precision).validate(recorder, dataloaders=loader)
    exact, mixed = (read_metadata(tmp_path / f"{p}.safetensors") for p in ("32-true", "bf16-mixed"))
    assert exact.sha256 == mixed.sha256


class _GrowingImages(torch.utils.data.Dataset):
    """Item ``i``: a ``[1, 6 + i, 6 + i]`` image of class ``i % 3`` (a collate per size: batches of one)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        return torch.randn(1, 6 + i, 6 + i), i % 3


def test_activations_that_change_size_between_batches_are_one_line(tmp_path):
    """A fully convolutional teacher fed images of several sizes: its feature maps change width, which the first
    batch's statistics cannot take; kept as the rank's problem (so under DDP every rank stops together)."""
    teacher = torch.nn.Sequential()
    teacher.add_module("conv", torch.nn.Conv2d(1, 2, 3))
    teacher.add_module("pool", torch.nn.AdaptiveAvgPool2d(1))
    teacher.add_module("flat", torch.nn.Flatten())
    teacher.add_module("fc", torch.nn.Linear(2, 3))
    recorder = ActivationRecorder(teacher, output=str(tmp_path / "m.safetensors"), layers=["conv", "fc"])
    loader = torch.utils.data.DataLoader(_GrowingImages(), batch_size=1)
    with pytest.raises(ZSKDError, match=r"^a batch gave activations of another size than the first batch: conv "
                                        r"\[2, 5, 5\] \(first \[2, 4, 4\]\); record the teacher at one input shape$"):
        tiny.quiet_trainer(tmp_path).validate(recorder, dataloaders=loader)
    assert not (tmp_path / "m.safetensors").exists()


def _image_and_label(batch: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([item["image"] for item in batch]), torch.tensor([item["label"] for item in batch])


class _DictSamples(L.LightningDataModule):
    """Samples as dicts, batched into ``(inputs, labels)`` by the training loader's own ``collate_fn``."""

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        generator = torch.Generator().manual_seed(0)
        items = [{"image": torch.randn(*tiny.INPUT_SHAPE, generator=generator), "label": i % 10} for i in range(30)]
        return torch.utils.data.DataLoader(items, batch_size=8, collate_fn=_image_and_label)


def test_record_batches_the_training_split_with_its_loaders_collate_fn(tmp_path):
    trainer = ZSKDTrainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, default_root_dir=tmp_path)
    trainer.record(ActivationRecorder(tiny.make_net(0), output=str(tmp_path / "m.safetensors")), _DictSamples())
    assert read_metadata(tmp_path / "m.safetensors").layers["logits"].count.tolist() == [3.0] * 10
