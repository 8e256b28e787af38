"""Distillation losses against hand-written formulas (plain torch ops, no F.kl_div)."""

from __future__ import annotations

import math

import pytest
import torch

from zskd_lightning.losses import kd_loss, kd_loss_per_sample, soft_cross_entropy, soft_target_kd_loss

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# A fixed small example: batch of 2, 3 classes.
STUDENT = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
TEACHER = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, -2.0]])


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    e = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def _kd_formula(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """``T^2 * mean_b sum_c p_t log(p_t / p_s)`` with ``p = softmax(logits / T)``."""
    p_s = _softmax(student.double() / t)
    p_t = _softmax(teacher.double() / t)
    per_sample = (p_t * torch.log(p_t / p_s)).sum(dim=-1)
    return t**2 * per_sample.mean()


def test_kd_loss_matches_written_out_numbers_at_t1():
    # Row 0: p_s = softmax([1, 2, 0.5]), p_t = softmax([2, 0, 1]); row 1 likewise. Written out with math.exp.
    def sm(v):
        z = sum(math.exp(x) for x in v)
        return [math.exp(x) / z for x in v]

    rows = []
    for s, t in zip(STUDENT.tolist(), TEACHER.tolist()):
        ps, pt = sm(s), sm(t)
        rows.append(sum(b * math.log(b / a) for a, b in zip(ps, pt)))
    expected = sum(rows) / len(rows)
    assert kd_loss(STUDENT, TEACHER, 1.0).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 4.0, 20.0])
def test_kd_loss_matches_formula(temperature):
    got = kd_loss(STUDENT, TEACHER, temperature)
    assert got.ndim == 0
    assert got.item() == pytest.approx(_kd_formula(STUDENT, TEACHER, temperature).item(), rel=1e-5)


def test_kd_loss_t_squared_scaling():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    for temperature in (1.0, 4.0):
        # KL between the tempered distributions, without the T^2 factor, written out.
        p_s, p_t = _softmax(s.double() / temperature), _softmax(t.double() / temperature)
        kl = (p_t * (torch.log(p_t) - torch.log(p_s))).sum(-1).mean().item()
        assert kd_loss(s, t, temperature).item() == pytest.approx(temperature**2 * kl, rel=1e-5)
    # Logits scaled by T: softmax(4x / 4) == softmax(x), so only the T^2 = 16 factor differs.
    assert kd_loss(4.0 * s, 4.0 * t, 4.0).item() == pytest.approx(16.0 * kd_loss(s, t, 1.0).item(), rel=1e-5)


def test_kd_loss_is_a_batch_mean():
    single = [kd_loss(STUDENT[i : i + 1], TEACHER[i : i + 1], 3.0) for i in range(2)]
    batch = kd_loss(STUDENT, TEACHER, 3.0)
    assert batch.item() == pytest.approx((single[0] + single[1]).item() / 2, rel=1e-6)
    doubled = kd_loss(torch.cat([STUDENT, STUDENT]), torch.cat([TEACHER, TEACHER]), 3.0)
    assert doubled.item() == pytest.approx(batch.item(), rel=1e-6)


def test_kd_loss_zero_when_student_equals_teacher():
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    for temperature in (1.0, 20.0):
        assert kd_loss(logits.clone(), logits, temperature).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(STUDENT, TEACHER, 1.0).item() > 0


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_loss_gradient_is_analytic(temperature):
    s = STUDENT.clone().requires_grad_(True)
    t = TEACHER.clone().requires_grad_(True)
    kd_loss(s, t, temperature).backward()
    batch = s.shape[0]
    expected = temperature * (_softmax(STUDENT / temperature) - _softmax(TEACHER / temperature)) / batch
    torch.testing.assert_close(s.grad, expected, rtol=1e-5, atol=1e-6)
    assert t.grad is None  # the teacher is a constant target


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_every_kd_loss_rejects_a_temperature_that_is_not_positive(temperature):
    soft = torch.softmax(TEACHER, dim=-1)
    for loss, target in ((kd_loss, TEACHER), (kd_loss_per_sample, TEACHER), (soft_target_kd_loss, soft)):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            loss(STUDENT, target, temperature)


@pytest.mark.parametrize("temperature", [1.0, 5.0])
def test_soft_target_kd_loss_matches_formula(temperature):
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    p_s = _softmax(STUDENT.double() / temperature)
    expected = temperature**2 * (p.double() * torch.log(p.double() / p_s)).sum(-1).mean()
    got = soft_target_kd_loss(STUDENT, p, temperature)
    assert got.ndim == 0
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # With p = softmax(teacher / T) it is exactly kd_loss.
    p_t = _softmax(TEACHER / temperature)
    assert soft_target_kd_loss(STUDENT, p_t, temperature).item() == pytest.approx(
        kd_loss(STUDENT, TEACHER, temperature).item(), rel=1e-5
    )


def test_soft_target_kd_loss_gradient_only_to_student():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], requires_grad=True)
    s = STUDENT.clone().requires_grad_(True)
    soft_target_kd_loss(s, p, 2.0).backward()
    torch.testing.assert_close(s.grad, 2.0 * (_softmax(STUDENT / 2.0) - p.detach()) / 2, rtol=1e-5, atol=1e-6)
    assert p.grad is None


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_soft_cross_entropy_matches_formula(temperature):
    p = torch.tensor([[0.7, 0.2, 0.1], [0.0, 0.0, 1.0]])
    expected = -(p * torch.log(_softmax(STUDENT / temperature))).sum(-1)
    got = soft_cross_entropy(STUDENT, p, temperature)
    assert got.shape == (2,)  # per sample, no reduction
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # One-hot targets at T=1 give the ordinary cross-entropy.
    hard = torch.tensor([0, 2])
    one_hot = torch.nn.functional.one_hot(hard, 3).float()
    torch.testing.assert_close(
        soft_cross_entropy(STUDENT, one_hot),
        torch.nn.functional.cross_entropy(STUDENT, hard, reduction="none"),
    )
