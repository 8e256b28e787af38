"""DistillationModule and ClassifierModule on real digits (CPU, a few batches)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from helpers.tiny import quiet_trainer
from safetensors.torch import load_file
from torch import nn

from zskd_lightning import ClassifierModule, DistillationModule, FrozenTeacher, ZSKDError, load_student
from zskd_lightning.errors import InvalidArgument
from zskd_lightning.data import DigitsDataModule
from zskd_lightning.losses import kd_loss, soft_target_kd_loss
from zskd_lightning.models import DigitsConvNet, DigitsConvNetHalf, LeNet5, LeNet5Half

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TEMPERATURE = 4.0


def _teacher_net() -> nn.Module:
    """A digits teacher with BatchNorm and Dropout, so any train-mode forward would be visible."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10)
    )


def _student() -> nn.Module:
    torch.manual_seed(2)
    return DigitsConvNetHalf()


def _digits_x(n: int = 16) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(5))


def _clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class _TeacherModeProbe(L.Callback):
    """Records whether any teacher submodule was in train mode during training and validation batches."""

    def __init__(self) -> None:
        self.seen: list[bool] = []

    def _record(self, pl_module) -> None:
        self.seen.append(any(m.training for m in pl_module.teacher.modules()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._record(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._record(pl_module)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._record(pl_module)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A DistillationModule fitted 2 short epochs (with validation) on digits, plus the pre-fit weights."""
    L.seed_everything(0, verbose=False)
    root = tmp_path_factory.mktemp("distill")
    teacher = FrozenTeacher(_teacher_net())
    student = _student()
    module = DistillationModule(teacher, student, temperature=TEMPERATURE)
    teacher_before, student_before = _clone_state(teacher), _clone_state(student)
    probe = _TeacherModeProbe()
    trainer = quiet_trainer(
        root,
        max_epochs=2,
        limit_train_batches=4,
        limit_val_batches=2,
        logger=CSVLogger(root, name="logs"),
        callbacks=[probe],
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    return {
        "module": module,
        "trainer": trainer,
        "teacher_before": teacher_before,
        "student_before": student_before,
        "probe": probe,
        "root": root,
    }


# ---------------------------------------------------------------------------------- the frozen teacher
def test_teacher_weights_bitwise_unchanged(distilled):
    after = distilled["module"].teacher.state_dict()
    before = distilled["teacher_before"]
    assert after.keys() == before.keys()
    for k, v in before.items():  # includes BatchNorm running stats
        assert torch.equal(after[k], v), k


def test_teacher_stays_in_eval_mode(distilled):
    module = distilled["module"]
    assert distilled["probe"].seen, "the probe callback never ran"
    assert not any(distilled["probe"].seen), "a teacher submodule was in train mode during fit"
    assert all(not m.training for m in module.teacher.modules())
    assert all(not p.requires_grad for p in module.teacher.parameters())


def test_only_student_parameters_are_optimized(distilled):
    module, trainer = distilled["module"], distilled["trainer"]
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.student.parameters()}
    assert optimized.isdisjoint({id(p) for p in module.teacher.parameters()})


def test_student_weights_changed_and_metrics_logged(distilled):
    after = distilled["module"].student.state_dict()
    changed = [k for k, v in distilled["student_before"].items() if not torch.equal(after[k], v)]
    assert changed, "no student weight changed during fit"
    assert distilled["trainer"].global_step == 8
    metrics = distilled["trainer"].callback_metrics
    for key in ("train/loss", "val/loss", "val/agreement", "val/acc"):
        assert key in metrics, key
    assert 0.0 <= float(metrics["val/agreement"]) <= 1.0


# --------------------------------------------------------------------------------------------- export
def test_export_student_writes_safetensors_and_a_record(distilled, tmp_path):
    module = distilled["module"]
    path = module.export_student(tmp_path / "sub" / "student.safetensors")
    state = load_file(path)
    assert set(state) == set(module.student.state_dict())  # the student alone: no teacher, no wrapping
    record = json.loads((tmp_path / "sub" / "student.json").read_text())
    assert record["class_path"].endswith("DigitsConvNetHalf") and record["init_args"] is None  # built in Python
    assert record["teacher"]["fingerprint"] == module.teacher.fingerprint()
    with pytest.raises(ZSKDError, match="pass the architecture"):
        load_student(path)
    fresh = load_student(path, network=DigitsConvNetHalf())
    module.student.eval()
    x = _digits_x()
    with torch.no_grad():
        assert torch.equal(fresh(x), module.student(x))


@pytest.mark.parametrize("name", ["student.json", "student.JSON"])
def test_an_export_to_the_records_name_is_refused_in_one_line(distilled, tmp_path, name):
    """``student.json`` is where the record beside the weights goes (on a case-blind file system, ``student.JSON``
    too): the weights would be written over."""
    with pytest.raises(InvalidArgument, match=rf"^cannot export the student's weights to .*{name}: the record"):
        distilled["module"].export_student(tmp_path / name)
    assert not list(tmp_path.glob("student.*"))


@pytest.mark.parametrize("name", ["student.pt", "student", "student.SAFETENSORS"])
def test_an_export_to_another_suffix_is_refused_in_one_line(distilled, tmp_path, name):
    """`load_student("student.json")` looks for student.safetensors: weights written as student.pt were not found."""
    with pytest.raises(InvalidArgument, match=rf"^cannot export the student's weights to .*{name}: they are a "
                                              r"safetensors file, named \*.safetensors"):
        distilled["module"].export_student(tmp_path / name)
    assert not list(tmp_path.glob("student*"))


def test_load_student_refuses_what_is_not_a_student(tmp_path):
    (tmp_path / "student.json").write_text(json.dumps({"format": "something else"}))
    (tmp_path / "student.safetensors").write_bytes(b"")
    with pytest.raises(ZSKDError, match="is not a student record"):
        load_student(tmp_path / "student.safetensors")
    with pytest.raises(ZSKDError, match="student record not found"):
        load_student(tmp_path / "other.safetensors")
    (tmp_path / "student.json").write_text(json.dumps({"format": "zskd-student", "version": 1, "class_path": "x"}))
    with pytest.raises(ZSKDError, match="student.json lacks init_args$"):
        load_student(tmp_path / "student.safetensors")


def test_an_export_that_fails_never_loads_weights_its_record_does_not_describe(distilled, tmp_path, monkeypatch):
    """A failed weights write or rename leaves the earlier export whole (weights and record); a crash between the
    new weights' rename and their record's write leaves the earlier record, which names other weights' sha256:
    refused on load, never loaded as what the record describes."""
    import zskd_lightning.export as export

    module = distilled["module"]
    path = module.export_student(tmp_path / "student.safetensors")
    earlier, weights = (tmp_path / "student.json").read_text(), Path(path).read_bytes()

    def full_disk(handle):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "save", lambda state: full_disk(None))
    with pytest.raises(OSError, match="No space left"):
        module.export_student(path)
    assert (tmp_path / "student.json").read_text() == earlier and Path(path).read_bytes() == weights
    load_student(path, network=DigitsConvNetHalf())  # loads: the record still describes these weights
    monkeypatch.undo()
    monkeypatch.setattr(export.os, "replace", lambda *args: full_disk(None))  # the rename fails (quota, a folder)
    with pytest.raises(OSError, match="No space left"):
        module.export_student(path)
    monkeypatch.undo()
    assert (tmp_path / "student.json").read_text() == earlier and Path(path).read_bytes() == weights
    load_student(path, network=DigitsConvNetHalf())
    parameter = next(module.student.parameters())
    original = parameter.detach().clone()
    with torch.no_grad():  # other weights (put back below: the fixture is shared), so the new export differs
        parameter.add_(1.0)
    monkeypatch.setattr(export, "write_text_atomic", lambda *args: full_disk(None))  # a crash before the record
    try:
        with pytest.raises(OSError, match="No space left"):
            module.export_student(path)
    finally:
        monkeypatch.undo()
        with torch.no_grad():
            parameter.copy_(original)
    assert (tmp_path / "student.json").read_text() == earlier and Path(path).read_bytes() != weights
    unpaired = (r"^weights .*student\.safetensors have sha256 [0-9a-f]{64}, but their record .*student\.json "
                r"describes [0-9a-f]{64}: they changed, or an export stopped before its record; export again$")
    with pytest.raises(ZSKDError, match=unpaired):
        load_student(path, network=DigitsConvNetHalf())
    with pytest.raises(ZSKDError, match=unpaired):  # as a teacher too
        FrozenTeacher(checkpoint=path, network=DigitsConvNetHalf())
    module.export_student(path)  # exporting again pairs them
    load_student(path, network=DigitsConvNetHalf())
    FrozenTeacher(checkpoint=path, network=DigitsConvNetHalf())


def test_a_record_without_weights_sha256_loads_its_weights_unchecked(distilled, tmp_path):
    """Records written before ``weights_sha256`` existed still load."""
    path = distilled["module"].export_student(tmp_path / "student.safetensors")
    record = json.loads((tmp_path / "student.json").read_text())
    assert record["weights_sha256"] == hashlib.sha256(Path(path).read_bytes()).hexdigest()
    del record["weights_sha256"]
    (tmp_path / "student.json").write_text(json.dumps(record))
    load_student(path, network=DigitsConvNetHalf())


def test_an_export_over_a_record_without_weights_sha256_removes_it_before_the_new_weights(distilled, tmp_path,
                                                                                          monkeypatch):
    """Such a record cannot tell other weights from its own: a crash before the new record leaves none."""
    import zskd_lightning.export as export

    path = distilled["module"].export_student(tmp_path / "student.safetensors")
    record = json.loads((tmp_path / "student.json").read_text())
    del record["weights_sha256"]
    (tmp_path / "student.json").write_text(json.dumps(record))

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "write_text_atomic", full_disk)
    with pytest.raises(OSError, match="No space left"):
        distilled["module"].export_student(path)
    monkeypatch.undo()
    with pytest.raises(ZSKDError, match="student record not found"):
        load_student(path, network=DigitsConvNetHalf())


def test_a_record_naming_a_class_outside_the_trusted_modules_says_to_pass_the_network(tmp_path, distilled):
    path = distilled["module"].export_student(tmp_path / "student.safetensors")
    record = json.loads((tmp_path / "student.json").read_text())
    (tmp_path / "student.json").write_text(json.dumps({**record, "class_path": "mypkg.TinyNet", "init_args": {}}))
    with pytest.raises(ZSKDError, match=r"outside the modules allowed here .*; build the architecture yourself and "
                                        r"pass it: load_student\(path, network=\.\.\.\)$"):
        load_student(path)


def test_the_record_takes_the_test_accuracy_of_the_exported_weights_only(tmp_path):
    """A test of the weights in memory (the ones exported at the end of fit) writes its accuracy into the record;
    a test of a checkpoint (``ckpt_path``: other weights) does not."""
    module = DistillationModule(FrozenTeacher(_teacher_net()), _student())
    trainer = quiet_trainer(tmp_path, limit_train_batches=2, limit_val_batches=0, limit_test_batches=2)
    data = DigitsDataModule(batch_size=16)
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(tmp_path / "other.ckpt")
    record = tmp_path / "student.json"
    trainer.test(module, datamodule=data, ckpt_path=tmp_path / "other.ckpt", weights_only=True)
    assert json.loads(record.read_text())["test_accuracy"] is None
    trainer.test(module, datamodule=data)
    accuracy = float(trainer.callback_metrics["test/acc"])
    assert json.loads(record.read_text())["test_accuracy"] == round(100 * accuracy, 4) and 0 < accuracy < 1


def test_on_train_end_writes_student_into_log_dir(distilled):
    trainer, module = distilled["trainer"], distilled["module"]
    state = load_file(f"{trainer.log_dir}/student.safetensors")
    assert set(state) == set(module.student.state_dict())
    for k, v in module.student.state_dict().items():
        assert torch.equal(state[k], v), k


def test_checkpoint_round_trip(distilled, tmp_path):
    module, trainer = distilled["module"], distilled["trainer"]
    path = tmp_path / "distill.ckpt"
    trainer.save_checkpoint(path)
    restored = DistillationModule.load_from_checkpoint(
        path, teacher=FrozenTeacher(_teacher_net()), student=DigitsConvNetHalf()
    )
    assert restored.hparams.temperature == TEMPERATURE
    restored.eval()
    module.eval()
    x = _digits_x()
    with torch.no_grad():
        assert torch.equal(restored(x), module(x))
        assert torch.equal(restored.teacher(x), module.teacher(x))
    assert all(not p.requires_grad for p in restored.teacher.parameters())


def test_checkpoints_hold_the_teacher_by_reference(distilled, tmp_path):
    """No teacher weights in the file; its fingerprint is checked on load; a module built in Python needs its
    teacher and student passed (one line says so)."""
    module, trainer = distilled["module"], distilled["trainer"]
    path = tmp_path / "distill.ckpt"
    trainer.save_checkpoint(path)
    content = torch.load(path, map_location="cpu", weights_only=True)
    assert not [k for k in content["state_dict"] if k.startswith("teacher.")]
    assert content["zskd_teacher"]["fingerprint"] == module.teacher.fingerprint()
    assert os.path.getsize(path) < 3 * sum(p.numel() * 4 for p in module.student.parameters()) + 100_000
    other_teacher = _teacher_net()
    with torch.no_grad():
        next(other_teacher.parameters()).add_(1.0)
    with pytest.raises(ZSKDError, match="was distilled from teacher"):
        DistillationModule.load_from_checkpoint(path, teacher=FrozenTeacher(other_teacher), student=DigitsConvNetHalf())
    with pytest.raises(ZSKDError, match="pass teacher and student"):
        DistillationModule.load_from_checkpoint(path)


def test_weights_only_false_is_refused_in_one_line(distilled, tmp_path):
    """The library never unpickles a file: asked to, loading says so in one line (it failed on the pre-read's
    'holds pickled Python objects' only when the file held some, else unpickled through Lightning)."""
    module, trainer = distilled["module"], distilled["trainer"]
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(InvalidArgument, match=r"^DistillationModule.load_from_checkpoint reads checkpoints without "
                                              r"unpickling \(weights_only=True\); got weights_only=False: leave it out$"):
        DistillationModule.load_from_checkpoint(tmp_path / "plain.ckpt", weights_only=False, teacher=module.teacher,
                                                student=DigitsConvNetHalf())


def test_an_unknown_target_source_is_refused_in_one_line():
    with pytest.raises(InvalidArgument, match=r"^target_source must be 'teacher' or 'batch', got 'Teacher'$"):
        DistillationModule(FrozenTeacher(_teacher_net()), DigitsConvNetHalf(), target_source="Teacher")


def test_predictions_are_float32_probabilities_under_bf16_true(tmp_path):
    """Softmax in the weights' dtype rounded probabilities to about 3 digits under '*-true' precision."""
    module = DistillationModule(FrozenTeacher(_teacher_net()), DigitsConvNetHalf()).to(torch.bfloat16)
    probabilities = module.predict_step(_digits_x().to(torch.bfloat16), 0)
    assert probabilities.dtype == torch.float32
    assert torch.allclose(probabilities.sum(-1), torch.ones(len(probabilities)), atol=1e-6)


def test_a_checkpoint_holding_another_teachers_weights_is_refused(distilled, tmp_path):
    """A checkpoint without the teacher's reference (older code) holds the teacher's weights; loaded as they
    were, they replaced the teacher whose file was checked. Now they must equal it: another teacher's weights are
    one line, the same teacher's load (and a file holding none gets the module's teacher)."""
    module, trainer = distilled["module"], distilled["trainer"]
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    content = torch.load(tmp_path / "new.ckpt", map_location="cpu", weights_only=True)
    del content["zskd_teacher"]
    other_teacher = FrozenTeacher(_teacher_net())
    with torch.no_grad():
        next(other_teacher.parameters()).add_(1.0)
    for name, teacher in (("same", module.teacher), ("other", other_teacher), ("none", None)):
        held = {} if teacher is None else {"teacher." + k: v.clone() for k, v in teacher.state_dict().items()}
        torch.save({**content, "state_dict": {**content["state_dict"], **held}}, tmp_path / f"{name}.ckpt")
    x = torch.randn(2, 1, 8, 8)
    for name in ("same", "none"):
        restored = DistillationModule.load_from_checkpoint(tmp_path / f"{name}.ckpt", teacher=module.teacher,
                                                           student=DigitsConvNetHalf())
        assert torch.equal(restored.teacher(x), module.teacher(x))
    # A file saved before FrozenTeacher flushed subnormal weights to zero holds them raw: the same teacher.
    planted = _teacher_net()
    with torch.no_grad():
        next(planted.parameters()).view(-1)[0] = 1e-40
    given = FrozenTeacher(planted)  # flushed to zero here
    first = next(given.parameters())
    key = next(k for k, v in given.state_dict().items() if v.data_ptr() == first.data_ptr())
    raw = {"teacher." + k: v.clone() for k, v in given.state_dict().items()}
    raw["teacher." + key].view(-1)[0] = 1e-40
    torch.save({**content, "state_dict": {**content["state_dict"], **raw}}, tmp_path / "raw.ckpt")
    restored = DistillationModule.load_from_checkpoint(tmp_path / "raw.ckpt", teacher=given, student=DigitsConvNetHalf())
    assert restored.teacher.state_dict()[key].view(-1)[0] == 0
    with pytest.raises(ZSKDError, match=r"^this checkpoint holds teacher weights that differ from the teacher given "
                                        r"now \(\(given in Python\); first at teacher\."):
        DistillationModule.load_from_checkpoint(tmp_path / "other.ckpt", teacher=module.teacher,
                                                student=DigitsConvNetHalf())


def test_a_bf16_true_fit_records_and_resumes_the_float32_teachers_fingerprint(tmp_path):
    """``precision: bf16-true`` casts the whole module, teacher included; the teacher's fingerprint is taken in
    ``setup``, before the cast, so checkpoints name the teacher the user gave and a resumed fit accepts them; the
    export at the end of fit probes the cast networks with inputs of their own type (it crashed before)."""
    teacher_fingerprint = FrozenTeacher(_teacher_net()).fingerprint()

    def fit(max_epochs: int, ckpt_path=None) -> L.Trainer:
        module = DistillationModule(FrozenTeacher(_teacher_net()), _student())
        trainer = quiet_trainer(tmp_path, precision="bf16-true", max_epochs=max_epochs, limit_train_batches=2,
                                limit_val_batches=0)
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=16), ckpt_path=ckpt_path)
        assert next(module.teacher.parameters()).dtype == torch.bfloat16  # the cast happened
        return trainer

    trainer = fit(1)
    exported = load_student(tmp_path / "student.safetensors", network=_student()).state_dict()
    trained = trainer.lightning_module.student.state_dict()
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k].float()) for k in trained)
    trainer.save_checkpoint(tmp_path / "bf16.ckpt")
    assert torch.load(tmp_path / "bf16.ckpt", weights_only=True)["zskd_teacher"]["fingerprint"] == teacher_fingerprint
    assert fit(2, ckpt_path=tmp_path / "bf16.ckpt").global_step == 4


def test_global_random_generators_come_back_on_resume_only(tmp_path):
    """Checkpoints hold the global generators (the student's dropout draws from them): a fit resumed from one
    takes them back at its first batch; a new fit of a module loaded from it keeps its own seed's."""
    from lightning.pytorch.callbacks import Callback

    class FirstBatchState(Callback):
        def __init__(self) -> None:
            self.state = None

        def on_train_batch_end(self, trainer, *unused) -> None:
            if self.state is None:
                self.state = torch.get_rng_state()

    def fit(module, ckpt_path=None, max_epochs=1) -> FirstBatchState:
        L.seed_everything(0, verbose=False)
        seen = FirstBatchState()
        quiet_trainer(tmp_path, max_epochs=max_epochs, limit_train_batches=2, limit_val_batches=0,
                      callbacks=[seen]).fit(module, datamodule=DigitsDataModule(batch_size=16), ckpt_path=ckpt_path)
        return seen

    first = DistillationModule(FrozenTeacher(_teacher_net()), _student(), export_filename=None)
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    L.seed_everything(0, verbose=False)
    trainer.fit(first, datamodule=DigitsDataModule(batch_size=16))
    torch.rand(100)  # the stream moves on after the save
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    saved = torch.load(tmp_path / "one.ckpt", weights_only=True)["zskd_random_states"][0]["torch"]
    loaded = DistillationModule.load_from_checkpoint(tmp_path / "one.ckpt", teacher=FrozenTeacher(_teacher_net()),
                                                     student=_student())
    fresh = DistillationModule(FrozenTeacher(_teacher_net()), _student(), export_filename=None)
    assert torch.equal(fit(loaded).state, fit(fresh).state)  # a new fit: seed_everything's stream, not the file's
    resumed = DistillationModule(FrozenTeacher(_teacher_net()), _student(), export_filename=None)
    state = fit(resumed, ckpt_path=tmp_path / "one.ckpt", max_epochs=2).state
    assert not torch.equal(state, fit(fresh).state)
    # the resumed first batch drew from the saved state: one KD step of this student draws nothing, so equal
    assert torch.equal(state, saved)


def test_a_plateau_scheduler_without_validation_is_refused_before_training(tmp_path):
    module = DistillationModule(FrozenTeacher(_teacher_net()), _student(), export_filename=None,
                                lr_scheduler=lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt))
    trainer = quiet_trainer(tmp_path, limit_train_batches=2, limit_val_batches=0)
    with pytest.raises(ZSKDError, match="ReduceLROnPlateau follows val/loss, and this run has no validation"):
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=16))
    assert trainer.global_step == 0


def test_a_plateau_scheduler_is_refused_where_val_loss_would_be_missing(tmp_path):
    """A classifier on data with no validation split (val_fraction 0), or a plateau stepped every training step,
    is refused before training; the data's no-validation fit leaves the Trainer's own setting as it was."""
    plateau = lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt)  # noqa: E731
    trainer = quiet_trainer(tmp_path, limit_train_batches=2)
    with pytest.raises(ZSKDError, match="this run has no validation"):
        trainer.fit(ClassifierModule(DigitsConvNet(), lr_scheduler=plateau),
                    datamodule=DigitsDataModule(batch_size=16, val_fraction=0.0))
    assert trainer.global_step == 0
    trainer.fit(ClassifierModule(DigitsConvNet()), datamodule=DigitsDataModule(batch_size=16, val_fraction=0.0))
    assert trainer.limit_val_batches == 1.0 and "val/acc" not in trainer.callback_metrics
    with pytest.raises(ZSKDError, match="not every step: use scheduler_interval: epoch"):
        quiet_trainer(tmp_path, limit_train_batches=2).fit(
            ClassifierModule(DigitsConvNet(), lr_scheduler=plateau, scheduler_interval="step"),
            datamodule=DigitsDataModule(batch_size=16))


def test_a_plateau_scheduler_steps_with_a_validation_every_n_epochs(tmp_path):
    """With check_val_every_n_epoch: 2 the plateau scheduler was stepped at epoch 0's end, before any val/loss:
    Lightning's error after an epoch of training. It now steps once per validation; step-based validation is
    refused before training."""
    plateau = lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt)  # noqa: E731
    module = ClassifierModule(DigitsConvNet(), lr_scheduler=plateau)
    trainer = quiet_trainer(tmp_path, max_epochs=4, limit_train_batches=2, limit_val_batches=1,
                            check_val_every_n_epoch=2)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=16))
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 2  # stepped after epochs 2 and 4
    by_steps = quiet_trainer(tmp_path, limit_train_batches=4, check_val_every_n_epoch=None, val_check_interval=2)
    with pytest.raises(ZSKDError, match=r"validates by training steps \(check_val_every_n_epoch: null\)"):
        by_steps.fit(ClassifierModule(DigitsConvNet(), lr_scheduler=plateau), datamodule=DigitsDataModule(batch_size=16))
    assert by_steps.global_step == 0


# ------------------------------------------------------------------------------- the training loss
def _modules(**kwargs) -> DistillationModule:
    teacher = FrozenTeacher(_teacher_net())
    student = _student()
    module = DistillationModule(teacher, student, temperature=TEMPERATURE, **kwargs)
    module.log = lambda *args, **kw: None  # training_step outside a Trainer
    return module


def test_ce_weight_ignored_for_soft_targets():
    x = _digits_x()
    soft = torch.softmax(torch.randn(16, 10, generator=torch.Generator().manual_seed(0)), dim=-1)
    without_ce = _modules(ce_weight=0.0).training_step((x, soft), 0)
    with_ce = _modules(ce_weight=1.0).training_step((x, soft), 0)
    assert torch.equal(with_ce, without_ce)


def test_ce_weight_adds_cross_entropy_for_hard_labels():
    x = _digits_x()
    labels = torch.arange(16) % 10
    base = _modules(ce_weight=0.0)
    with_ce = _modules(ce_weight=0.5)
    with torch.no_grad():
        student_logits, teacher_logits = base.student(x), base.teacher(x)
    loss0 = base.training_step((x, labels), 0)
    torch.testing.assert_close(loss0, kd_loss(student_logits, teacher_logits, TEMPERATURE))
    torch.testing.assert_close(
        with_ce.training_step((x, labels), 0), loss0 + 0.5 * F.cross_entropy(student_logits, labels)
    )
    torch.testing.assert_close(_modules(kd_weight=0.25).training_step((x, labels), 0), 0.25 * loss0)


def test_target_source_batch_uses_the_soft_targets():
    x = _digits_x()
    soft = torch.softmax(3 * torch.randn(16, 10, generator=torch.Generator().manual_seed(0)), dim=-1)
    module = _modules(target_source="batch")
    calls = []
    module.teacher.register_forward_hook(lambda *args: calls.append(1))
    loss = module.training_step((x, soft), 0)
    with torch.no_grad():
        expected = soft_target_kd_loss(module.student(x), soft, TEMPERATURE)
    torch.testing.assert_close(loss, expected)
    assert not calls, "target_source='batch' must not query the teacher"
    from_teacher = _modules(target_source="teacher").training_step((x, soft), 0)
    assert not torch.allclose(loss, from_teacher)
    loss.backward()
    assert all(p.grad is not None for p in module.student.parameters())


class _BlendingData(L.LightningDataModule):
    """Digits batches from a datamodule whose ``batch_augmentation`` blends inputs (as ImpressionDataModule's)."""

    def __init__(self) -> None:
        super().__init__()
        from zskd_lightning.augment import BatchAugmentation

        self.batch_augmentation = BatchAugmentation(mix=0.5)

    def train_dataloader(self):
        x = _digits_x()
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.arange(len(x)) % 10), batch_size=8)


@pytest.mark.parametrize("settings", [{"target_source": "batch"}, {"ce_weight": 0.5}])
def test_blended_inputs_with_targets_the_batch_carries_are_refused(tmp_path, settings):
    """A blend keeps the batch's targets: only the teacher, labelling each blend, may train on it."""
    with pytest.raises(ZSKDError, match=r"^the data's batch_augmentation blends inputs \(mix=0.5\) but not the targets"):
        quiet_trainer(tmp_path, max_steps=1).fit(_modules(**settings), datamodule=_BlendingData())
    quiet_trainer(tmp_path, max_steps=1).fit(_modules(), datamodule=_BlendingData())  # the teacher labels: fine


def test_target_source_batch_rejects_hard_labels():
    with pytest.raises(ZSKDError, match="soft targets"):
        _modules(target_source="batch").training_step((_digits_x(), torch.arange(16) % 10), 0)
    logits = torch.randn(16, 10, generator=torch.Generator().manual_seed(0))  # e.g. a Lopes cache's logits / T
    with pytest.raises(ZSKDError, match=r"^target_source='batch' needs soft targets that are probabilities; .*Lopes"):
        _modules(target_source="batch").training_step((_digits_x(), logits), 0)


def test_soft_targets_rounded_to_bfloat16_still_count_as_probabilities():
    """A ``bf16-true`` Trainer casts the batch's targets: ``[0.9, 0.0111 x 9]`` sums to about 0.9984 in bfloat16,
    outside float32's 1e-3 but within bfloat16's epsilon (2^-7); a row summing to 0.99 is not."""
    from zskd_lightning.distillation import _probability_problem

    rows = torch.tensor([[0.9] + [0.1 / 9] * 9] * 4).bfloat16()
    assert abs(float(rows.float().sum(-1)[0]) - 1) > 1e-3 and _probability_problem(rows) is None
    assert _probability_problem(rows.float() * 0.99) is not None  # float32 keeps its 1e-3
    assert _probability_problem((rows.float() * 0.99).bfloat16()) is not None


# -------------------------------------------------------------------------------------- mismatches
def test_num_classes_mismatch_at_the_first_step():
    """Without an input shape to probe at setup (a user's own datamodule), the first batch finds it."""
    module = DistillationModule(FrozenTeacher(DigitsConvNet(num_classes=10)), DigitsConvNetHalf(num_classes=5))
    module.log = lambda *args, **kw: None
    with pytest.raises(ZSKDError, match="num_classes: teacher outputs 10, student outputs 5$"):
        module.training_step((_digits_x(), torch.arange(16) % 10), 0)


def test_temperature_must_be_positive():
    with pytest.raises(ZSKDError, match="temperature"):
        DistillationModule(DigitsConvNet(), DigitsConvNetHalf(), temperature=0.0)


@pytest.mark.parametrize(
    "role, teacher, student, name",
    [
        ("student", DigitsConvNet, LeNet5Half, "LeNet5Half"),
        ("teacher", LeNet5, DigitsConvNetHalf, "LeNet5"),
    ],
)
def test_model_that_cannot_take_the_data_shape(tmp_path, role, teacher, student, name):
    module = DistillationModule(teacher(), student())
    trainer = quiet_trainer(tmp_path, limit_train_batches=1, limit_val_batches=1)
    with pytest.raises(ZSKDError) as err:
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=8))
    message = str(err.value)
    assert "\n" not in message
    assert role in message and name in message
    assert "(1, 8, 8)" in message and "(32, 32)" in message
    assert trainer.global_step == 0


def test_classifier_network_with_other_classes_than_the_data(tmp_path):
    """Caught at setup in one line, not as cross-entropy's "target out of bounds" deep in the first step."""
    trainer = quiet_trainer(tmp_path, limit_train_batches=1, limit_val_batches=1)
    with pytest.raises(ZSKDError, match=r"^network DigitsConvNet outputs 5 classes, and the data "
                                        r"\(DigitsDataModule\) has 10: set the network's num_classes to 10$"):
        trainer.fit(ClassifierModule(DigitsConvNet(num_classes=5)), datamodule=DigitsDataModule(batch_size=8))


def test_classifier_network_that_cannot_take_the_data_shape(tmp_path):
    trainer = quiet_trainer(tmp_path, limit_train_batches=1, limit_val_batches=1)
    with pytest.raises(ZSKDError) as err:
        trainer.fit(ClassifierModule(LeNet5Half()), datamodule=DigitsDataModule(batch_size=8))
    message = str(err.value)
    assert "LeNet5Half" in message and "(1, 8, 8)" in message and "(32, 32)" in message


# -------------------------------------------------------------------------------------- classifier
def test_classifier_learns_digits(tmp_path):
    L.seed_everything(0, verbose=False)
    module = ClassifierModule(DigitsConvNetHalf())
    datamodule = DigitsDataModule(batch_size=64)
    trainer = quiet_trainer(tmp_path, max_epochs=5)
    trainer.fit(module, datamodule=datamodule)
    val_acc = float(trainer.callback_metrics["val/acc"])
    assert val_acc > 0.8, val_acc
    assert "train/loss" in trainer.callback_metrics and "val/loss" in trainer.callback_metrics
    results = trainer.test(module, datamodule=datamodule, verbose=False)
    assert results[0]["test/acc"] > 0.8, results
    assert "test/acc" in trainer.callback_metrics


# ------------------------------------------------------------------------------------------- module modes
def test_a_submodule_the_user_froze_in_eval_mode_stays_frozen_through_a_fit(tmp_path):
    """A student whose first BatchNorm its owner keeps in eval mode (frozen statistics): the setup probe, the
    validation loop, each epoch's start and SSD-KD's synthesis (which reads the student) all leave it so."""
    from helpers import tiny

    from zskd_lightning import SSDKDSynthesizer

    def frozen_student() -> nn.Module:
        student = nn.Sequential(nn.BatchNorm2d(1), tiny.make_net(1, width=4))
        student[0].running_mean.fill_(0.25)
        student[0].eval()
        return student

    offline = DistillationModule(tiny.make_net(0), frozen_student(), export_filename=None)
    data = tiny.make_datamodule(tmp_path / "cache", num_impressions=32, num_val_impressions=8)
    quiet_trainer(tmp_path, max_epochs=2).fit(offline, datamodule=data)
    model, online = tiny.online_setup(steps_per_epoch=4, synthesizer=SSDKDSynthesizer)
    model.student = frozen_student()
    quiet_trainer(tmp_path, max_epochs=2).fit(model, datamodule=online)
    for student in (offline.student, model.student):
        assert not student[0].training and student[1].training
        assert torch.equal(student[0].running_mean, torch.full((1,), 0.25))
    # a student handed over in eval mode as a whole (load_student returns one so) is trained in train mode
    whole_eval = DistillationModule(tiny.make_net(0), tiny.make_net(1, width=4).eval(), export_filename=None)
    quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=1).fit(whole_eval, datamodule=data)
    assert whole_eval.student.training and all(m.training for m in whole_eval.student.modules())


def test_evaluating_gives_every_submodule_its_own_mode_back():
    from zskd_lightning.modes import evaluating

    net = nn.Sequential(nn.BatchNorm1d(2), nn.Sequential(nn.Dropout(), nn.BatchNorm1d(2)))
    net[1][1].eval()
    before = [m.training for m in net.modules()]
    with evaluating(net):
        assert not any(m.training for m in net.modules())
    assert [m.training for m in net.modules()] == before
    with pytest.raises(RuntimeError), evaluating(net):
        raise RuntimeError("synthesis failed")
    assert [m.training for m in net.modules()] == before
    with evaluating(None):
        pass


def test_evaluating_restores_modes_through_train_overrides():
    """A module whose ``train`` does more than set ``.training`` (here: a stage it keeps frozen, and a switch
    it derives from the mode) has it run on the way back, and still ends in its recorded modes."""
    from zskd_lightning.modes import evaluating

    class FrozenStem(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.head = nn.BatchNorm1d(2), nn.Dropout()
            self.cached = False  # derived from the mode in train()

        def train(self, mode: bool = True):
            super().train(mode)
            self.stem.eval()  # kept frozen
            self.cached = not mode
            return self

    net = nn.Sequential(FrozenStem(), nn.Linear(2, 2)).train()
    before = [m.training for m in net.modules()]
    assert before == [True, True, False, True, True] and not net[0].cached
    with evaluating(net):
        assert net[0].cached and not any(m.training for m in net.modules())
    assert [m.training for m in net.modules()] == before and not net[0].cached


def test_a_subclass_own_network_arguments_stay_out_of_the_hyperparameters(tmp_path):
    """save_hyperparameters collects a subclass's init arguments too: networks among them would be pickled into
    checkpoints (which then need weights_only=False); they are left out, other values kept."""

    class WithAuxiliary(DistillationModule):
        def __init__(self, teacher: nn.Module, student: nn.Module, auxiliary: nn.Module, alpha: float = 0.5):
            super().__init__(teacher, student, export_filename=None)
            self.auxiliary = auxiliary

    class WithProbe(ClassifierModule):
        def __init__(self, network: nn.Module, probe: nn.Module, beta: int = 3):
            super().__init__(network)
            self.probe = probe

    for model in (WithAuxiliary(_teacher_net(), _student(), nn.Linear(2, 2)), WithProbe(_student(), nn.Linear(2, 2))):
        assert not any(isinstance(v, nn.Module) for v in model.hparams.values())
        assert model.hparams.get("alpha", model.hparams.get("beta")) in (0.5, 3)
        trainer = quiet_trainer(tmp_path, limit_train_batches=1, limit_val_batches=0)
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=16))
        trainer.save_checkpoint(tmp_path / "sub.ckpt")
        saved = torch.load(tmp_path / "sub.ckpt", weights_only=True)  # no pickled network in it
        assert set(saved["hyper_parameters"]) & {"auxiliary", "probe", "teacher", "student", "network"} == set()
