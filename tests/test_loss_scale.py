"""Loss scaling of synthesis under float16 autocast (a Trainer's ``16-mixed``), on CPU: float16 autocast runs
there too, and flushes small gradients to zero the same way."""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import tiny
from torch import nn

from zskd_lightning.errors import ZSKDError
from zskd_lightning.synthesis import FastSynthesizer, LossScale
from zskd_lightning.synthesis.api import Chunk
from zskd_lightning.synthesis.loss_scale import autocasts_to_float16


def float16():
    return torch.autocast("cpu", dtype=torch.float16)


def bfloat16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.fixture()
def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def relative_error(found: torch.Tensor, reference: torch.Tensor) -> float:
    return float((found - reference).norm() / reference.norm())


def input_gradient(net: nn.Module, x: torch.Tensor, autocast, tiny_factor: float):
    """``compute(scale)`` for :meth:`LossScale.backward`: the gradient of ``tiny_factor * sum(net(x))``."""

    def compute(scale: float):
        current = x.detach().requires_grad_(True)
        with autocast():
            loss = net(current).float().sum() * tiny_factor
        return list(torch.autograd.grad(loss * scale, current)), None

    return compute


def test_float16_is_told_apart_from_other_arithmetic():
    assert autocasts_to_float16(float16, "cpu")
    assert not autocasts_to_float16(bfloat16, "cpu") and not autocasts_to_float16(contextlib.nullcontext, "cpu")
    assert LossScale.for_autocast(float16, "cpu").enabled and not LossScale.for_autocast(bfloat16, "cpu").enabled


def test_small_float16_gradients_survive_only_with_a_loss_scale(small_net):
    x = torch.randn(4, 1, 8, 8)
    reference, _ = LossScale(False).backward(input_gradient(small_net, x, contextlib.nullcontext, 1e-9))
    flushed, _ = LossScale(False).backward(input_gradient(small_net, x, float16, 1e-9))
    scaled, _ = LossScale(True).backward(input_gradient(small_net, x, float16, 1e-9))
    assert float(reference[0].abs().max()) > 0 and not bool(flushed[0].any())  # float16 flushed them to zero
    assert relative_error(scaled[0], reference[0]) < 0.02  # float16 rounding, nothing lost


def test_an_overflowing_step_is_taken_again_at_smaller_scales(small_net):
    x = torch.randn(4, 1, 8, 8)
    reference, _ = LossScale(False).backward(input_gradient(small_net, x, contextlib.nullcontext, 1.0))
    retries = []
    scale = LossScale(True, init_scale=2.0 ** 40)  # float16 overflows (max 65504) on the way back
    grads, _ = scale.backward(input_gradient(small_net, x, float16, 1.0), lambda: retries.append(1))
    assert retries and scale.scale == 2.0 ** 40 / 2 ** len(retries) and torch.isfinite(grads[0]).all()
    assert relative_error(grads[0], reference[0]) < 0.02
    grower = LossScale(True, init_scale=4.0, growth_interval=2)
    for step in range(3):  # the scale doubles after 2 finite steps in a row; every step's gradients are true
        grads, _ = grower.backward(input_gradient(small_net, x, float16, 1.0))
        assert relative_error(grads[0], reference[0]) < 0.02, step
    assert grower.scale == 8.0
    restored = LossScale(True)
    restored.load_state_dict(grower.state_dict())
    assert restored.state_dict() == grower.state_dict() == {"scale": 8.0, "finite_steps": 1}


def test_a_loss_that_is_not_finite_is_one_line_not_an_endless_retry():
    def compute(scale: float):
        return [torch.full((3,), float("nan"))], None

    with pytest.raises(ZSKDError, match="not finite at any loss scale"):
        LossScale(True).backward(compute)
    grads, _ = LossScale(False).backward(compute)  # off: no check, as without it
    assert torch.isnan(grads[0]).all()


def test_a_float16_generator_round_retried_after_an_overflow_ends_as_one_not_retried(monkeypatch):
    """A retried step starts from the BatchNorm statistics it first saw: the round ends as one that never
    overflowed (scales are powers of two, exact in floating point)."""
    from zskd_lightning.pixels import InputSpec
    from zskd_lightning.synthesis.api import SynthesisContext

    context = SynthesisContext(teacher=tiny.make_net(0).eval(), student=tiny.make_net(1, width=4),
                               input_spec=InputSpec(tiny.INPUT_SHAPE, tiny.DIGITS_MEAN, tiny.DIGITS_STD),
                               num_classes=10, autocast=float16)
    made, used = [], []
    make = LossScale.for_autocast.__func__
    monkeypatch.setattr(LossScale, "for_autocast", classmethod(lambda cls, *a: used.append(make(cls, *a)) or used[-1]))
    for init_scale in (2.0 ** 60, None):  # then from the scale the retries ended at: no retry
        monkeypatch.setattr(LossScale, "INIT_SCALE", init_scale or used[0].scale)
        synthesizer = FastSynthesizer(batch_size=16, width=8, noise_dim=8, steps_per_round=2)
        synthesizer.setup(context)
        result = synthesizer.round(context, Chunk.of(0, 0, 0, 16))
        made.append((result, {k: v.clone() for k, v in synthesizer.generator.state_dict().items()}))
    assert used[0].enabled and used[0].scale < 2.0 ** 60 and used[1].scale == used[0].scale
    (retried, retried_state), (plain, plain_state) = made
    assert torch.isfinite(retried.loss).all()
    assert synthesizer.state_dict()["loss_scale"] == used[1].state_dict()  # kept across rounds, in checkpoints
    assert torch.equal(plain.inputs, retried.inputs)
    assert all(torch.equal(plain_state[k], v) for k, v in retried_state.items())
