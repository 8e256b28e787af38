"""Distillation losses.

The losses take logits ``[B, C]``; each returns a scalar averaged over the batch, except the per-sample forms
(``[B]``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from zskd_lightning.errors import InvalidArgument


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise InvalidArgument(f"temperature must be > 0, got {temperature}")


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton's distillation loss ``T^2 * KL(softmax(t / T) || softmax(s / T))``, batch-mean.

    Args:
        student_logits: ``[B, C]``, carries gradients.
        teacher_logits: ``[B, C]``, treated as a constant target.
        temperature: ``T > 0``. The ``T^2`` factor keeps gradient magnitudes comparable across ``T``.

    Returns:
        Scalar: the KL divergence summed over classes, averaged over the ``B`` samples, times ``T^2``.
    """
    _check_temperature(temperature)
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def kd_loss_per_sample(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Each sample's ``T^2 * KL(softmax(t / T) || softmax(s / T))``, shape ``[B]`` (the terms :func:`kd_loss`
    averages; its batch mean equals :func:`kd_loss` up to float summation order)."""
    _check_temperature(temperature)
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(dim=-1)
    return kl * temperature**2


def soft_target_kd_loss(student_logits: Tensor, target_probs: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(p || softmax(s / T))`` for a given target distribution ``p`` ``[B, C]`` (rows sum to 1).

    Used when a batch carries its own soft targets (e.g. the impressions' sampled targets) instead of
    re-querying the teacher.
    """
    _check_temperature(temperature)
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, target_probs.detach().float(), reduction="batchmean", log_target=False)
    return kl * temperature**2


def soft_cross_entropy(logits: Tensor, target_probs: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-sample cross-entropy ``-sum_c p_c log softmax(logits / T)_c``, shape ``[B]`` (no reduction)."""
    return -(target_probs * F.log_softmax(logits.float() / temperature, dim=-1)).sum(dim=-1)


def top1_hits(logits: Tensor, labels: Tensor) -> Tensor:
    """``[B]`` float: 1 where the argmax of ``logits [B, K]`` is ``labels [B]`` (its mean is the accuracy)."""
    return (logits.argmax(dim=-1) == labels).float()
