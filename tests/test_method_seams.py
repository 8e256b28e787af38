"""The seams every method plugs into: feature taps, per-sample weights, derived identities, and the synthesis
callback that the data asks for itself (``zskd fit`` and a plain ``Trainer`` behave the same)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import tiny
from helpers.tiny import one_torch_thread  # noqa: F401  (module-wide autouse fixture)
from torch import nn

from zskd_lightning import (
    DistillationModule,
    ImpressionSynthesis,
    ModulatingFunction,
    TeacherUncertainty,
    ZSKDSynthesizer,
)
from zskd_lightning.describe import Recorded, describe
from zskd_lightning.errors import InvalidArgument, ZSKDError
from zskd_lightning.losses import kd_loss, kd_loss_per_sample
from zskd_lightning.pixels import InputSpec
from zskd_lightning.synthesis import Chunk, SynthesisContext
from zskd_lightning.taps import FeatureTaps, Tap, replacing, run_from


# ------------------------------------------------------------------------------------------------ taps
def test_taps_record_outputs_and_inputs_and_remove_their_hooks():
    net = tiny.make_net(0)
    fc = net.body[5]
    x = torch.randn(4, 1, 8, 8)
    with FeatureTaps(net, [Tap("body.5"), Tap("body.5", "input")]) as taps:
        logits = net(x)
        assert set(taps.features) == {"body.5", "body.5:input"}
        torch.testing.assert_close(fc(taps.features["body.5:input"]), taps.features["body.5"])
        assert torch.equal(net.body[6:](taps.features["body.5"]), logits)
    assert not fc._forward_hooks and not fc._forward_pre_hooks


def test_taps_name_a_missing_module_in_one_line():
    with pytest.raises(ZSKDError, match=r"TinyNet has no submodule 'body\.99'") as caught:
        with FeatureTaps(tiny.make_net(0), [Tap("body.1"), Tap("body.99")]):
            pass
    assert "\n" not in str(caught.value)


def test_replacing_substitutes_an_activation_and_is_undone():
    net = tiny.make_net(0)
    value = torch.zeros(3, 32)
    with replacing(net, Tap("body.6", "input"), value):
        out = net(torch.randn(3, 1, 8, 8))
    torch.testing.assert_close(out, net.body[6](value))
    assert not net.body[6]._forward_pre_hooks


@pytest.mark.parametrize("where", ["output", "input"])
def test_an_in_place_layer_after_the_tap_leaves_the_callers_value_alone(where):
    """``run_from`` on a tap before ``ReLU(inplace=True)``: the ReLU rectifies the pass's copy, not ``value``."""
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3))
    tap = Tap("0") if where == "output" else Tap("1", "input")
    value = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    before = value.clone()
    assert (before < 0).any()
    out = run_from(net, tap, value, (4,))
    assert torch.equal(value, before)
    torch.testing.assert_close(out, net[2](torch.relu(before)))


def test_run_from_runs_the_prediction_and_puts_each_modules_mode_back():
    """A network in train mode: BatchNorm reads (and keeps) its running statistics, Dropout keeps every unit."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Dropout(0.5), nn.Linear(5, 3), nn.Linear(3, 3))
    net[1].running_mean.uniform_(-1.0, 1.0)
    net[4].eval()  # mixed modes, put back as they were
    statistics = (net[1].running_mean.clone(), net[1].running_var.clone(), net[1].num_batches_tracked.clone())
    value = torch.randn(6, 3)
    out = run_from(net, Tap("3"), value, (4,))
    torch.testing.assert_close(out, net[4](value))
    value = torch.randn(6, 5)
    out = run_from(net, Tap("1"), value, (4,))  # Dropout after the tap: no unit dropped, the same output twice
    torch.testing.assert_close(out, net[4](net[3](value)))
    assert all(torch.equal(a, b) for a, b in zip(statistics, (net[1].running_mean, net[1].running_var,
                                                              net[1].num_batches_tracked)))
    assert [module.training for module in net.modules()] == [True, True, True, True, True, False]


class FreezingStage(nn.Linear):
    """A layer whose ``train`` override does more than set ``.training``: it records each mode it was put in."""

    def __init__(self) -> None:
        super().__init__(4, 4)
        self.modes_set: list[bool] = []

    def train(self, mode: bool = True) -> FreezingStage:
        self.modes_set.append(mode)
        return super().train(mode)


def test_run_from_puts_modes_back_through_train_overrides():
    """The mode comes back through the module's own ``train`` (its override runs), not by setting the flag."""
    net = nn.Sequential(FreezingStage(), nn.Linear(4, 3))
    net.train()
    net[0].modes_set.clear()
    run_from(net, Tap("1"), torch.randn(2, 3), (4,))
    assert net[0].modes_set[-1] is True and False in net[0].modes_set
    assert [module.training for module in net.modules()] == [True, True, True]


class ReusedActivation(nn.Module):
    """One ReLU module called at two places in a forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.act(x))))


def test_a_module_that_runs_twice_a_pass_is_refused_as_a_tap_in_one_line():
    net = ReusedActivation()
    with FeatureTaps(net, [Tap("fc1"), Tap("act")]) as taps:
        with pytest.raises(ZSKDError, match=r"^the tapped activation 'act' ran twice in one forward pass of "
                                            r"ReusedActivation \(one module used at two places\)"):
            net(torch.randn(2, 4))
        taps.clear()
        net.act(torch.randn(2, 4))  # called on its own, outside a pass of the model: recorded as it is
        assert set(taps.features) == {"act"}
    assert not net._forward_hooks and not net._forward_pre_hooks and not net.act._forward_hooks
    with FeatureTaps(net, [Tap("fc1"), Tap("fc2", "input")]) as taps:  # modules that run once: fine, pass after pass
        for _ in range(2):
            net(torch.randn(2, 4))
        assert set(taps.features) == {"fc1", "fc2:input"}
    with pytest.raises(ZSKDError, match=r"^ReusedActivation runs 'act' 2 times a forward pass"):
        run_from(net, Tap("act"), torch.zeros(2, 4), (4,))


# ------------------------------------------------------------------------------------------ weights
def test_teacher_uncertainty_on_hand_computed_cases():
    logits = torch.tensor([[0.0, 0.0], [torch.log(torch.tensor(3.0)), 0.0]])  # p_max 0.5 and 0.75
    torch.testing.assert_close(TeacherUncertainty(gamma=2.0)(logits), torch.tensor([0.25, 0.0625]))
    torch.testing.assert_close(TeacherUncertainty(gamma=0.0)(logits), torch.ones(2))
    with pytest.raises(InvalidArgument):
        TeacherUncertainty(gamma=-1)


def test_a_batch_the_teacher_is_sure_of_keeps_its_loss():
    """Margins of 30 logits: every difficulty rounds to 0 in float32; normalized, the batch is weighed
    uniformly (a batch of zero weights would train nothing)."""
    logits = torch.zeros(4, 10)
    logits[torch.arange(4), torch.tensor([0, 3, 3, 7])] = 30.0
    assert not TeacherUncertainty()(logits).any()
    at_one = ModulatingFunction(temperature=1.0, diversity=False)
    torch.testing.assert_close(at_one(logits), torch.ones(4))
    mixed = torch.cat([logits, torch.zeros(1, 10)])  # one unsure sample: it takes all the weight
    torch.testing.assert_close(at_one(mixed), torch.tensor([0.0, 0.0, 0.0, 0.0, 5.0]))
    # at the default, the distillation temperature (20), the sure samples keep a share of the weight
    by_default = ModulatingFunction(diversity=False)(mixed)
    assert by_default[:4].min() > 0.2 and by_default[4] < 2.0


class FirstOnly(TeacherUncertainty):
    """Weight 1 for the first sample, 0 for the others."""

    def __call__(self, teacher_logits, student_logits=None):
        weights = torch.zeros(len(teacher_logits))
        weights[0] = 1.0
        return weights


def test_inversion_applies_per_sample_weights():
    teacher = tiny.shipped_teacher()
    context = SynthesisContext(teacher=teacher, input_spec=InputSpec(tiny.INPUT_SHAPE, tiny.DIGITS_MEAN,
                                                                      tiny.DIGITS_STD), num_classes=10)
    results = {}
    for name, weights in (("plain", None), ("first", FirstOnly())):
        synthesizer = ZSKDSynthesizer(iterations=5, lr=0.1, sample_weights=weights)
        synthesizer.setup(context)
        results[name] = synthesizer.invert(context, Chunk.of(0, 0, 0, 8))
    plain, first = results["plain"], results["first"]
    initial = ZSKDSynthesizer().initial_inputs(8, context, Chunk.of(0, 0, 0, 8).rng.torch)
    assert torch.equal(first.inputs[1:], initial[1:])  # weight 0: no gradient, the noise is untouched
    assert torch.equal(first.inputs[0], plain.inputs[0])  # weight 1: as without weights (no coupling)
    assert ZSKDSynthesizer(sample_weights=TeacherUncertainty(1.0)).identity()["args"]["sample_weights"] == {
        "name": "TeacherUncertainty", "args": {"gamma": 1.0, "temperature": 1.0}}


def test_a_subclass_is_another_method_to_the_cache():
    """A subclass that keeps its parent's arguments but changes what it computes must not reuse the parent's
    impressions: without a name of its own it is named by its class."""

    class SharperZSKD(ZSKDSynthesizer):
        pass

    assert ZSKDSynthesizer().identity()["name"] == "zskd"
    assert SharperZSKD().identity()["name"] == "SharperZSKD"


def test_distillation_applies_per_sample_weights():
    torch.manual_seed(0)
    teacher, student = tiny.make_net(0), tiny.make_net(1, width=4)
    x, y = torch.randn(6, 1, 8, 8), torch.rand(6, 10)
    module = DistillationModule(teacher, student, temperature=4.0, sample_weights=FirstOnly())
    module.log = lambda *args, **kwargs: None
    loss = module.training_step((x, y), 0)
    with torch.no_grad():
        per_sample = kd_loss_per_sample(student(x), teacher(x), 4.0)
    torch.testing.assert_close(loss, per_sample[0] / 6)
    torch.testing.assert_close(per_sample.mean(), kd_loss(student(x), teacher(x), 4.0))


# ---------------------------------------------------------------------------------------- identities
def test_describe_refuses_values_without_a_stable_description():
    class Holder(Recorded):
        def __init__(self, thing) -> None:
            self.thing = thing

    assert describe(Holder([1, 2.5, "a"])) == {"name": "Holder", "args": {"thing": [1, 2.5, "a"]}}
    # a path as a Path (LopesSynthesizer(metadata=Path(...)) was refused) describes as the same path as a string
    assert describe(Holder(Path("runs") / "m.safetensors")) == describe(Holder(os.path.join("runs", "m.safetensors")))
    with pytest.raises(InvalidArgument, match="thing of type Linear has no stable description"):
        describe(Holder(nn.Linear(1, 1)))
    with pytest.raises(InvalidArgument, match="must be finite"):
        describe(Holder(float("nan")))
    with pytest.raises(InvalidArgument, match=r"^weights\.b\[1\] of type Linear"):  # a bare mapping: no leading dot
        describe({"weights": {"a": 1, "b": [2, nn.Linear(1, 1)]}})


# ------------------------------------------------------------------------------- the callback, attached
def test_a_plain_trainer_synthesizes_without_the_callback_given_by_hand(tmp_path):
    teacher = tiny.make_net(0)
    datamodule = tiny.make_datamodule(tmp_path / "cache", num_impressions=16)
    model = DistillationModule(teacher=teacher, student=tiny.make_net(1, width=4), export_filename=None)
    trainer = tiny.quiet_trainer(tmp_path)
    assert not any(isinstance(c, ImpressionSynthesis) for c in trainer.callbacks)
    trainer.fit(model, datamodule=datamodule)
    assert trainer.global_step > 0
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["num_impressions"] == 16
    assert sum(isinstance(c, ImpressionSynthesis) for c in trainer.callbacks) == 1


def test_a_callback_given_by_hand_is_kept(tmp_path):
    datamodule = tiny.make_datamodule(tmp_path / "cache", num_impressions=16)
    model = DistillationModule(teacher=tiny.make_net(0), student=tiny.make_net(1, width=4), export_filename=None)
    mine = ImpressionSynthesis(grid_filename=None)
    trainer = tiny.quiet_trainer(tmp_path, callbacks=[mine], limit_train_batches=0)
    trainer.fit(model, datamodule=datamodule)
    assert [c for c in trainer.callbacks if isinstance(c, ImpressionSynthesis)] == [mine]
    assert not (tmp_path / "impressions.png").exists()


def test_a_tuner_callback_that_asks_for_data_first_gets_the_impressions(tmp_path, monkeypatch):
    """Lightning runs its BatchSizeFinder before every other callback's on_fit_start, and it reads training
    batches there: the impressions are made then, once (the synthesis callback's own turn reuses them), instead
    of an error telling to add the callback that is already attached."""
    from lightning.pytorch.callbacks import BatchSizeFinder

    from zskd_lightning.impressions import driver

    fills = []
    original = driver.fill_cache
    monkeypatch.setattr(driver, "fill_cache", lambda *args, **kwargs: fills.append(1) or original(*args, **kwargs))
    datamodule = tiny.make_datamodule(tmp_path / "cache", num_impressions=32, batch_size=4)
    model = DistillationModule(teacher=tiny.make_net(0), student=tiny.make_net(1, width=4), export_filename=None)
    finder = BatchSizeFinder(mode="power", steps_per_trial=1, init_val=4, max_trials=1)
    trainer = tiny.quiet_trainer(tmp_path, callbacks=[finder], limit_train_batches=2)
    trainer.fit(model, datamodule=datamodule)
    assert trainer.global_step > 0 and finder.optimal_batch_size == datamodule.batch_size
    assert len(fills) == 1  # made once: the synthesis callback's own turn found them made
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["num_impressions"] == 32
