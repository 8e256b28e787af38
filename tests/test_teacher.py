"""FrozenTeacher: freezing, permanent eval mode, loading (state_dict / Lightning / CLI checkpoints), errors."""

from __future__ import annotations

import ast
import io
import json
import re
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers.tiny import quiet_trainer
from safetensors.torch import save_file
from torch import nn

from zskd_lightning import ClassifierModule, FrozenTeacher, ZSKDError
from zskd_lightning import hparams
from zskd_lightning.errors import InvalidArgument
from zskd_lightning.data import DigitsDataModule
from zskd_lightning.models import DigitsConvNet, DigitsConvNetHalf
from zskd_lightning.files import file_sha256
from zskd_lightning.teacher import as_frozen_teacher

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _bn_dropout_net() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 10)
    )


def _digits_batch(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(3))


def _assert_one_line_naming(err: pytest.ExceptionInfo, path: Path) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    return message


@pytest.fixture(scope="module")
def lightning_checkpoint(tmp_path_factory) -> Path:
    """A ClassifierModule(DigitsConvNetHalf) checkpoint from a 1-epoch plain-Python fit (no recorded network)."""
    L.seed_everything(0, verbose=False)
    root = tmp_path_factory.mktemp("classifier")
    trainer = quiet_trainer(root, limit_train_batches=3, limit_val_batches=1)
    module = ClassifierModule(DigitsConvNetHalf())
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    path = root / "classifier.ckpt"
    trainer.save_checkpoint(path)
    return path


# ------------------------------------------------------------------------------------------ freezing
def test_all_parameters_frozen_and_eval():
    teacher = FrozenTeacher(_bn_dropout_net())
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    assert all(not m.training for m in teacher.modules())
    assert teacher.count_classes((1, 8, 8)) == 10


def test_train_keeps_eval_mode_and_deterministic_outputs():
    net = _bn_dropout_net()
    teacher = FrozenTeacher(net)
    x = _digits_batch(8)
    before = teacher(x)
    stats_before = {k: v.clone() for k, v in net[2].state_dict().items()}
    returned = teacher.train()
    assert returned is teacher
    assert not teacher.training
    assert not teacher.network.training
    assert all(not m.training for m in teacher.modules())
    teacher.train(True)
    out1, out2 = teacher(x), teacher(x)
    # Dropout off and BatchNorm using running stats: identical outputs, running stats untouched.
    assert torch.equal(out1, out2)
    assert torch.equal(out1, before)
    for k, v in net[2].state_dict().items():
        assert torch.equal(v, stats_before[k]), k


def test_parent_train_does_not_unfreeze():
    teacher = FrozenTeacher(_bn_dropout_net())
    parent = nn.ModuleDict({"teacher": teacher, "student": nn.Linear(2, 2)})
    parent.eval()
    parent.train()
    assert parent["student"].training
    assert all(not m.training for m in teacher.modules())


def test_as_frozen_teacher_freezes_in_place_and_is_idempotent():
    net = _bn_dropout_net()
    teacher = as_frozen_teacher(net)
    assert teacher.network is net
    assert all(not p.requires_grad for p in net.parameters())
    assert as_frozen_teacher(teacher) is teacher


def test_requires_network_or_checkpoint():
    with pytest.raises(ZSKDError, match="a teacher needs a `network`, a `checkpoint`, or both"):
        FrozenTeacher()


# ------------------------------------------------------------------------------------------- loading
#: Loading checks compare the teacher's logits bit for bit with its source network's, so their teachers keep the
#: source's contiguous layout (channels-last, the default, rounds differently; tests/test_kernels.py checks it).
SOURCE_LAYOUT = {"channels_last": False}


def test_load_plain_state_dict(tmp_path):
    source = DigitsConvNet()
    path = tmp_path / "teacher.pt"
    torch.save(source.state_dict(), path)
    teacher = FrozenTeacher(network=DigitsConvNet(), checkpoint=str(path), **SOURCE_LAYOUT)
    assert teacher.checkpoint == str(path)
    for k, v in source.state_dict().items():
        assert torch.equal(teacher.network.state_dict()[k], v), k
    x = _digits_batch()
    source.eval()
    assert torch.equal(teacher(x), source(x))
    assert all(not p.requires_grad for p in teacher.parameters())


def test_a_classifier_checkpoint_built_in_python_needs_its_network_in_one_line(lightning_checkpoint):
    """Without a recorded spec the load said nothing of `network` (Lightning's TypeError on __init__)."""
    with pytest.raises(ZSKDError, match=r"does not record the network \(the module was built in Python, not from "
                                        r"a config\): pass network, e.g. ClassifierModule.load_from_checkpoint"):
        ClassifierModule.load_from_checkpoint(lightning_checkpoint)
    with pytest.raises(InvalidArgument, match=r"^ClassifierModule.load_from_checkpoint reads checkpoints without "
                                              r"unpickling \(weights_only=True\); got weights_only=False"):
        ClassifierModule.load_from_checkpoint(lightning_checkpoint, weights_only=False, network=DigitsConvNetHalf())
    with pytest.raises(InvalidArgument, match=r"^ClassifierModule.load_from_checkpoint takes no hparams_file: "):
        ClassifierModule.load_from_checkpoint(lightning_checkpoint, hparams_file="hparams.yaml",
                                              network=DigitsConvNetHalf())
    for source in (io.BytesIO(lightning_checkpoint.read_bytes()), "s3://bucket/teacher.ckpt"):
        with pytest.raises(InvalidArgument, match=r"^ClassifierModule.load_from_checkpoint reads a local checkpoint "
                                                  r"file by its path, got .*: save or copy it to a file first$"):
            ClassifierModule.load_from_checkpoint(source, network=DigitsConvNetHalf())


def test_a_classifier_checkpoint_is_read_once(lightning_checkpoint, monkeypatch, tmp_path):
    """The checkpoint whose specs were checked is the one built: a file replaced after the check is not read."""
    checkpoint = tmp_path / "classifier.ckpt"  # a copy: the module's other tests read the shared one
    shutil.copy(lightning_checkpoint, checkpoint)
    original = torch.load(checkpoint, map_location="cpu", weights_only=True)
    replaced = dict(original, state_dict={k: torch.zeros_like(v) for k, v in original["state_dict"].items()})
    checked = hparams.read_checkpoint

    def check_then_replace(path, **kwargs):
        content = checked(path, **kwargs)
        torch.save(replaced, path)
        return content

    monkeypatch.setattr(hparams, "read_checkpoint", check_then_replace)
    module = ClassifierModule.load_from_checkpoint(checkpoint, network=DigitsConvNetHalf())
    for key, value in module.state_dict().items():
        assert torch.equal(value, original["state_dict"][key]), key
    weights = tmp_path / "student.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(InvalidArgument, match=r"student.safetensors holds a network's weights, not a "
                                              r"ClassifierModule checkpoint: load it with .*load_student\(path\)"):
        ClassifierModule.load_from_checkpoint(weights, network=DigitsConvNetHalf())


def test_load_lightning_checkpoint_with_network(lightning_checkpoint):
    trained = ClassifierModule.load_from_checkpoint(lightning_checkpoint, network=DigitsConvNetHalf())
    trained.eval()
    teacher = FrozenTeacher(network=DigitsConvNetHalf(), checkpoint=str(lightning_checkpoint), **SOURCE_LAYOUT)
    x = _digits_batch()
    with torch.no_grad():
        assert torch.equal(teacher(x), trained(x))
    assert teacher.count_classes((1, 8, 8)) == 10


def test_checkpoint_without_architecture_and_no_network(lightning_checkpoint):
    # A plain-Python ClassifierModule checkpoint does not record its network.
    with pytest.raises(ZSKDError) as err:
        FrozenTeacher(checkpoint=str(lightning_checkpoint))
    message = _assert_one_line_naming(err, lightning_checkpoint)
    assert "network" in message


def test_load_cli_checkpoint_without_network(cli_teacher_checkpoint):
    content = torch.load(cli_teacher_checkpoint, map_location="cpu", weights_only=True)
    assert content["hyper_parameters"]["network"]["class_path"] == "zskd_lightning.models.DigitsConvNetHalf"
    teacher = FrozenTeacher(checkpoint=str(cli_teacher_checkpoint))
    assert type(teacher.network) is DigitsConvNetHalf
    weights = {k[len("network.") :]: v for k, v in content["state_dict"].items() if k.startswith("network.")}
    assert weights.keys() == teacher.network.state_dict().keys()
    for k, v in weights.items():
        assert torch.equal(teacher.network.state_dict()[k], v), k
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not teacher.training


def test_load_handmade_checkpoint_recording_architecture(tmp_path):
    source = DigitsConvNet(width=4, num_classes=7)
    checkpoint = {
        "state_dict": {f"network.{k}": v for k, v in source.state_dict().items()},
        "hyper_parameters": {
            "network": {
                "class_path": "zskd_lightning.models.DigitsConvNet",
                "init_args": {"in_channels": 1, "num_classes": 7, "width": 4},
            }
        },
    }
    path = tmp_path / "handmade.ckpt"
    torch.save(checkpoint, path)
    teacher = FrozenTeacher(checkpoint=str(path), **SOURCE_LAYOUT)
    assert type(teacher.network) is DigitsConvNet and teacher.network.width == 4
    assert teacher.count_classes((1, 8, 8)) == 7
    source.eval()
    x = _digits_batch()
    assert torch.equal(teacher(x), source(x))


# --------------------------------------------------------------------------------------- fingerprint
def test_fingerprint_stable_across_reload_and_sensitive_to_one_weight(tmp_path):
    net = DigitsConvNetHalf()
    path = tmp_path / "teacher.pt"
    torch.save(net.state_dict(), path)
    a = FrozenTeacher(network=DigitsConvNetHalf(), checkpoint=str(path))
    b = FrozenTeacher(network=DigitsConvNetHalf(), checkpoint=str(path))
    fp = a.fingerprint()
    assert re.fullmatch(r"[0-9a-f]{64}", fp)
    assert fp == a.fingerprint() == b.fingerprint()
    assert FrozenTeacher(DigitsConvNetHalf()).fingerprint() != fp  # other random weights
    original = b.network.classifier[-1].weight[0, 0].item()
    with torch.no_grad():
        b.network.classifier[-1].weight[0, 0] += 1e-3
    assert b.fingerprint() != fp
    with torch.no_grad():
        b.network.classifier[-1].weight[0, 0] = original
    assert b.fingerprint() == fp  # a pure function of the weights


def test_fingerprint_single_bit_change():
    net = DigitsConvNetHalf()
    teacher = FrozenTeacher(net)
    fp = teacher.fingerprint()
    with torch.no_grad():
        w = net.features[0].weight
        w.view(-1)[5] = torch.nextafter(w.view(-1)[5], torch.tensor(float("inf")))
    assert teacher.fingerprint() != fp


def test_fingerprint_of_network_with_batchnorm():
    # BatchNorm registers a 0-dim `num_batches_tracked` buffer; fingerprinting must handle it.
    net = _bn_dropout_net()
    fp = FrozenTeacher(net).fingerprint()
    assert len(fp) == 64
    with torch.no_grad():
        net[2].running_mean[0] += 1.0
    assert FrozenTeacher(net).fingerprint() != fp


# ------------------------------------------------------------------------------------ subnormal weights
def test_subnormal_weights_are_flushed_without_changing_outputs(tmp_path):
    """Weight decay leaves dead units' weights subnormal (slow on x86 CPUs): the teacher sets them to zero on
    load, and its logits and input gradients stay bit-identical."""
    torch.manual_seed(0)
    net = DigitsConvNet()
    tiny = torch.finfo(torch.float32).tiny
    with torch.no_grad():
        linear = next(m for m in net.modules() if isinstance(m, nn.Linear))
        linear.weight[:3] = torch.empty_like(linear.weight[:3]).uniform_(-tiny / 2, tiny / 2)  # three dead units
        linear.bias[:3] = tiny / 4
        conv = net.features[0].weight
        scattered = torch.rand(conv.shape) < 0.1
        conv[scattered] = tiny / 8
    planted = int(((torch.cat([p.flatten() for p in net.parameters()]).abs() < tiny)
                   & (torch.cat([p.flatten() for p in net.parameters()]) != 0)).sum())
    assert planted > 3 * linear.in_features
    path = tmp_path / "teacher.pt"
    torch.save(net.state_dict(), path)
    kept = DigitsConvNet()
    kept.load_state_dict(torch.load(path))
    kept.eval()
    teacher = FrozenTeacher(network=DigitsConvNet(), checkpoint=str(path), **SOURCE_LAYOUT)
    assert teacher.flushed_subnormals == planted
    weights = torch.cat([p.flatten() for p in teacher.parameters()])
    assert not ((weights.abs() < tiny) & (weights != 0)).any()
    x = _digits_batch(16)
    grads = []
    for model in (kept, teacher):
        xi = x.clone().requires_grad_(True)
        logits = model(xi)
        (grad,) = torch.autograd.grad(torch.log_softmax(logits / 20, dim=1)[:, 3].sum(), xi)
        grads.append((logits.detach(), grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    zeroed = DigitsConvNet()
    zeroed.load_state_dict({k: torch.where(v.abs() < tiny, torch.zeros_like(v), v) for k, v in net.state_dict().items()})
    assert teacher.fingerprint() == FrozenTeacher(zeroed).fingerprint()  # the weights it computes with


# -------------------------------------------------------------------------------------------- errors
def test_missing_file(tmp_path):
    path = tmp_path / "nope" / "teacher.ckpt"
    with pytest.raises(ZSKDError) as err:
        FrozenTeacher(network=DigitsConvNet(), checkpoint=str(path))
    assert "not found" in _assert_one_line_naming(err, path)


@pytest.mark.parametrize("content", [b"\x00garbage\xff" * 50, b"PK\x03\x04 truncated zip"], ids=["garbage", "zip"])
def test_corrupt_file(tmp_path, content):
    path = tmp_path / "teacher.pt"
    path.write_bytes(content)
    with pytest.raises(ZSKDError) as err:
        FrozenTeacher(network=DigitsConvNet(), checkpoint=str(path))
    assert "pickled" not in _assert_one_line_naming(err, path)  # bytes that are no pickle hold no Python objects


def test_a_safetensors_file_under_another_name_is_not_called_pickled(tmp_path):
    """Its first bytes are no pickle opcode: torch's unpickler fails on them before any object."""
    path = tmp_path / "teacher.pt"
    save_file(DigitsConvNet().state_dict(), str(path))
    with pytest.raises(ZSKDError) as err:
        FrozenTeacher(network=DigitsConvNet(), checkpoint=str(path))
    assert "*.safetensors" in _assert_one_line_naming(err, path)


def test_truncated_checkpoint(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(DigitsConvNet().state_dict(), good)
    path = tmp_path / "truncated.pt"
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ZSKDError) as err:
        FrozenTeacher(network=DigitsConvNet(), checkpoint=str(path))
    _assert_one_line_naming(err, path)


def test_file_holding_no_state_dict(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ZSKDError) as err:
        FrozenTeacher(network=DigitsConvNet(), checkpoint=str(path))
    _assert_one_line_naming(err, path)


def test_state_dict_with_wrong_shapes(tmp_path):
    path = tmp_path / "wide.pt"
    torch.save(DigitsConvNet().state_dict(), path)  # width 32 weights into a width-16 network
    with pytest.raises(ZSKDError) as err:
        FrozenTeacher(network=DigitsConvNetHalf(), checkpoint=str(path))
    message = _assert_one_line_naming(err, path)
    assert "DigitsConvNetHalf" in message
    assert "shape" in message
    # checkpoint vs model shapes of a mismatching key
    assert "classifier.1.weight (128, 1024) vs (64, 512)" in message


def test_weights_saved_through_a_wrapper_load_as_they_are(tmp_path):
    """DDP / DataParallel (``module.``) and ``torch.compile`` (``_orig_mod.``) put a prefix on every key."""
    source = DigitsConvNet()
    path = tmp_path / "wrapped.pt"
    torch.save({f"module._orig_mod.{k}": v for k, v in source.state_dict().items()}, path)
    teacher = FrozenTeacher(network=DigitsConvNet(), checkpoint=str(path), **SOURCE_LAYOUT)
    assert all(torch.equal(teacher.network.state_dict()[k], v) for k, v in source.state_dict().items())


def test_a_plain_state_dict_whose_child_is_named_network_loads_as_it_is(tmp_path):
    """Only a checkpoint's weights are looked for under ``network.`` / ``student.``: a network of one's own with
    a child named ``network`` beside a ``head`` keeps every key."""
    source = nn.Sequential()
    source.add_module("network", nn.Sequential(nn.Flatten(), nn.Linear(64, 16)))
    source.add_module("head", nn.Linear(16, 10))
    path = tmp_path / "own.pt"
    torch.save(source.state_dict(), path)
    fresh = nn.Sequential()
    fresh.add_module("network", nn.Sequential(nn.Flatten(), nn.Linear(64, 16)))
    fresh.add_module("head", nn.Linear(16, 10))
    teacher = FrozenTeacher(network=fresh, checkpoint=str(path), **SOURCE_LAYOUT)
    assert all(torch.equal(teacher.network.state_dict()[k], v) for k, v in source.state_dict().items())


def test_weights_of_a_network_kept_as_an_attribute_name_its_prefix(tmp_path):
    path = tmp_path / "own_module.pt"
    state = {f"model.{k}": v for k, v in DigitsConvNet().state_dict().items()}
    torch.save({**state, "loss_fn.weight": torch.ones(10)}, path)  # a LightningModule's other state beside it
    with pytest.raises(ZSKDError) as err:
        FrozenTeacher(network=DigitsConvNet(), checkpoint=str(path))
    message = _assert_one_line_naming(err, path)
    assert "its keys carry the prefix 'model.'" in message and "module.model.state_dict()" in message


def test_state_dict_with_wrong_keys(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).state_dict(), path)
    with pytest.raises(ZSKDError) as err:
        FrozenTeacher(network=DigitsConvNetHalf(), checkpoint=str(path))
    message = _assert_one_line_naming(err, path)
    assert "missing keys" in message and "classifier.1.weight" in message
    assert "unexpected keys" in message and "1.weight" in message


def test_lightning_checkpoint_into_wrong_network(lightning_checkpoint):
    with pytest.raises(ZSKDError) as err:
        FrozenTeacher(network=DigitsConvNet(), checkpoint=str(lightning_checkpoint))
    message = _assert_one_line_naming(err, lightning_checkpoint)
    assert "shape" in message


def test_instantiate_builds_class_paths_inside_lists():
    from zskd_lightning.synthesis import PixelL2Prior
    from zskd_lightning.teacher import instantiate

    from zskd_lightning.synthesis import Regularizer, Synthesizer

    synthesizer = instantiate({"class_path": "zskd_lightning.ZSKDSynthesizer", "init_args": {
        "iterations": 3, "regularizers": [{"class_path": "zskd_lightning.synthesis.PixelL2Prior",
                                           "init_args": {"weight": 0.002}}]}},
        bases=(Synthesizer, Regularizer), modules=("zskd_lightning",))
    assert synthesizer.iterations == 3
    assert [type(r) for r in synthesizer.regularizers] == [PixelL2Prior] and synthesizer.regularizers[0].weight == 0.002


# ------------------------------------------------------------------------------------- no code from a file
class _Payload:
    """Pickled into a checkpoint: unpickling it would create ``marker`` (if any code from the file ran)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_with_a_pickled_payload_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "payload.ckpt"
    torch.save({"state_dict": DigitsConvNetHalf().state_dict(), "extra": _Payload(str(marker))}, path)
    with pytest.raises(ZSKDError) as err:
        FrozenTeacher(network=DigitsConvNetHalf(), checkpoint=str(path))
    message = _assert_one_line_naming(err, path)
    assert "pickled Python objects" in message and "state_dict" in message
    assert not marker.exists()


@pytest.mark.parametrize(("class_path", "reason"), [
    ("subprocess.call", "outside the modules allowed here"),
    ("os.system", "outside the modules allowed here"),
    ("zskd_lightning.models.lenet.torch", "not a Module class"),
])
def test_a_checkpoint_naming_a_class_outside_the_allow_list_is_refused(tmp_path, class_path, reason):
    path = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": DigitsConvNetHalf().state_dict(),
                "hyper_parameters": {"network": {"class_path": class_path, "init_args": {"args": ["true"]}}}}, path)
    with pytest.raises(ZSKDError) as err:
        FrozenTeacher(checkpoint=str(path))
    message = _assert_one_line_naming(err, path)
    assert reason in message and class_path in message


def test_a_class_outside_the_allow_list_is_refused_before_its_module_is_imported(tmp_path, monkeypatch):
    """An import alone can run code: the module a crafted checkpoint names is never imported."""
    import sys

    marker = tmp_path / "imported"
    (tmp_path / "planted_module.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Net: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": DigitsConvNetHalf().state_dict(),
                "hyper_parameters": {"network": {"class_path": "planted_module.Net", "init_args": {}}}}, path)
    with pytest.raises(ZSKDError, match="outside the modules allowed here"):
        FrozenTeacher(checkpoint=str(path))
    assert not marker.exists() and "planted_module" not in sys.modules


def test_a_nested_class_path_is_checked_too(tmp_path):
    from zskd_lightning.teacher import instantiate

    with pytest.raises(ZSKDError, match="outside the modules allowed here"):
        instantiate({"class_path": "zskd_lightning.models.DigitsConvNet",
                     "init_args": {"width": {"class_path": "subprocess.Popen", "init_args": {}}}})


def test_the_package_never_loads_with_weights_only_false():
    """Every ``torch.load`` call in the package passes ``weights_only=True`` as a constant (torch < 2.6, which the
    package allows, unpickles by default), and no text asks for ``weights_only=False``."""
    package = Path(__file__).resolve().parents[1] / "zskd_lightning"
    offenders, loads = [str(p) for p in package.rglob("*.py") if "weights_only=False" in p.read_text()], 0
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                loads += 1
                flags = [k.value for k in node.keywords if k.arg == "weights_only"]
                if not (len(flags) == 1 and isinstance(flags[0], ast.Constant) and flags[0].value is True):
                    offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders and loads >= 1


# ------------------------------------------------------------------------------- safetensors and sha256
def _safetensors_teacher(tmp_path: Path, record: dict | None) -> tuple[nn.Module, Path]:
    source = DigitsConvNet()
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    if record is not None:
        (tmp_path / "teacher.json").write_text(json.dumps(record))
    return source.eval(), path


def test_safetensors_with_record_builds_its_architecture(tmp_path):
    source, path = _safetensors_teacher(
        tmp_path, {"class_path": "zskd_lightning.models.DigitsConvNet", "init_args": {}})
    teacher = FrozenTeacher(checkpoint=str(path), **SOURCE_LAYOUT)
    assert isinstance(teacher.network, DigitsConvNet)
    x = _digits_batch()
    assert torch.equal(teacher(x), source(x))
    assert teacher.fingerprint() == FrozenTeacher(network=source).fingerprint()


@pytest.mark.parametrize("record, expected", [
    ({"format": "zskd-student", "version": 2, "class_path": "zskd_lightning.models.DigitsConvNet", "init_args": {}},
     r"record .*teacher.json has version 2 of format 'zskd-student'; this library reads version 1"),
    ({"format": "zskd-teacher", "version": 1, "init_args": {}}, r"record .*teacher.json lacks class_path"),
])
def test_a_record_in_one_of_the_librarys_formats_is_checked_as_one(tmp_path, record, expected):
    """A student or benchmark-teacher record beside a teacher's weights is read as ``load_student`` reads it."""
    _, path = _safetensors_teacher(tmp_path, record)
    with pytest.raises(ZSKDError, match=expected) as err:
        FrozenTeacher(checkpoint=str(path))
    _assert_one_line_naming(err, tmp_path / "teacher.json")


def test_safetensors_without_record_needs_the_network(tmp_path):
    source, path = _safetensors_teacher(tmp_path, None)
    with pytest.raises(ZSKDError) as err:
        FrozenTeacher(checkpoint=str(path))
    assert "network" in _assert_one_line_naming(err, path)
    assert torch.equal(FrozenTeacher(network=DigitsConvNet(), checkpoint=str(path), **SOURCE_LAYOUT)(_digits_batch()),
                       source(_digits_batch()))


def test_truncated_safetensors(tmp_path):
    _, path = _safetensors_teacher(tmp_path, None)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ZSKDError) as err:
        FrozenTeacher(network=DigitsConvNet(), checkpoint=str(path))
    _assert_one_line_naming(err, path)


def test_sha256_checked_before_loading(tmp_path):
    _, path = _safetensors_teacher(tmp_path, None)
    digest = file_sha256(path)
    FrozenTeacher(network=DigitsConvNet(), checkpoint=str(path), sha256=digest.upper())  # hex case does not matter
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    path.write_bytes(bytes(data))
    with pytest.raises(ZSKDError) as err:
        FrozenTeacher(network=DigitsConvNet(), checkpoint=str(path), sha256=digest)
    message = _assert_one_line_naming(err, path)
    assert digest in message and file_sha256(path) in message and "changed" in message


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_the_bytes_checked_are_the_bytes_loaded(tmp_path, monkeypatch, suffix):
    """A file replaced between the digest's check and the load (another process writing a new teacher) is not
    read again: the weights loaded are those whose digest matched."""
    import hashlib

    source, checked = DigitsConvNet(), DigitsConvNet()
    path = tmp_path / f"teacher{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    digest, sha256 = file_sha256(path), hashlib.sha256

    class ReplacedWhenChecked:  # the digest of the bytes given, then the file on disk holds other weights
        def __init__(self, data=b""):
            self.inner = sha256(data)

        def update(self, data):
            self.inner.update(data)

        def hexdigest(self):
            other = {k: torch.zeros_like(v) for k, v in state.items()}
            save_file(other, path) if suffix == ".safetensors" else torch.save(other, path)
            return self.inner.hexdigest()

    monkeypatch.setattr(hashlib, "sha256", ReplacedWhenChecked)
    teacher = FrozenTeacher(network=checked, checkpoint=str(path), sha256=digest, **SOURCE_LAYOUT)
    monkeypatch.setattr(hashlib, "sha256", sha256)
    assert file_sha256(path) != digest  # the file was replaced
    loaded = teacher.network.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


@pytest.mark.parametrize("given", ["2e0669d7bc33", "SHA256:abc", lambda d: f"{d}  teacher.safetensors"])
def test_a_malformed_sha256_is_refused_as_such_not_blamed_on_the_file(tmp_path, given):
    """A teacher fingerprint's prefix, or `sha256sum`'s line with the file name, is not a digest of the file:
    refused in one line that says what the value must be (the file is unchanged)."""
    _, path = _safetensors_teacher(tmp_path, None)
    value = given(file_sha256(path)) if callable(given) else given
    with pytest.raises(InvalidArgument) as err:
        FrozenTeacher(network=DigitsConvNet(), checkpoint=str(path), sha256=value)
    message = str(err.value)
    assert "\n" not in message and "64 hex digits" in message and repr(value) in message and "changed" not in message


def test_benchmark_teachers_load_by_their_recorded_digest():
    """The teachers committed under benchmarks/teachers/ match their records (sha256 of the file, fingerprint)."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks" / "teachers"
    records = sorted(folder.glob("*.json"))
    assert records, f"no benchmark teacher under {folder}"
    for record_path in records:
        record = json.loads(record_path.read_text())
        teacher = FrozenTeacher(checkpoint=str(record_path.with_suffix(".safetensors")), sha256=record["sha256"])
        assert teacher.fingerprint() == record["fingerprint"], record_path
        assert 0 < record["test_accuracy"] <= 100 and record["training_s"] > 0
