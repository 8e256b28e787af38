"""Early checks that turn deep torch errors into one-line messages naming the model and the shapes."""

from __future__ import annotations

import torch
from torch import nn

from zskd_lightning.errors import InvalidArgument, ZSKDError
from zskd_lightning.modes import evaluating


def probe_num_outputs(model: nn.Module, input_shape: tuple[int, ...], role: str) -> int:
    """Run ``model`` on a zero batch ``[2, *input_shape]`` and return its number of outputs (classes).

    Raises:
        ZSKDError: the model cannot take ``input_shape`` (message: role, class, expected vs given shape)
            or does not return ``[B, num_classes]`` logits.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    # the weights' own float type: a model a '*-true' precision cast (bf16 weights) takes bf16 inputs
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    try:
        with torch.no_grad(), evaluating(model):
            out = model(torch.zeros(2, *input_shape, device=device, dtype=dtype))
    except ZSKDError:  # already one line naming its cause (e.g. FrozenTeacher's .view on channels-last features)
        raise
    except RuntimeError as err:
        expected = getattr(model, "input_size", None) or getattr(getattr(model, "network", None), "input_size", None)
        hint = f"; it expects inputs of spatial size {tuple(expected)}" if expected else ""
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ZSKDError(
            f"{role} {_name(model)} cannot take inputs of shape {tuple(input_shape)} (C, H, W) from the data{hint}: "
            f"{first}"
        ) from err
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ZSKDError(f"{role} {_name(model)} must return logits [B, num_classes], got {shape}")
    return int(out.shape[1])


def check_same_classes(teacher_classes: int, student_classes: int) -> None:
    if teacher_classes != student_classes:
        raise ZSKDError(
            f"teacher and student disagree on num_classes: teacher outputs {teacher_classes}, "
            f"student outputs {student_classes}"
        )


def _name(model: nn.Module) -> str:
    inner = getattr(model, "network", None)
    return type(inner).__name__ if isinstance(inner, nn.Module) else type(model).__name__


def check_trainer_precision(precision: str, task: str = "synthesis") -> None:
    """One-line error for a Trainer precision that casts the models' weights (``"bf16-true"``, ``"16-true"``,
    ``"64-true"``): ``task`` (synthesis, recording) runs the teacher in float32 (the ``-mixed`` precisions
    autocast instead, and are fine)."""
    if str(precision).endswith("-true") and str(precision) != "32-true":
        raise InvalidArgument(
            f"Trainer precision {precision!r} casts the teacher's weights, and {task} runs it in float32: use "
            "'32-true', 'bf16-mixed' or '16-mixed'"
        )
