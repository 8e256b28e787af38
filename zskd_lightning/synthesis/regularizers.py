"""Input priors that compose with any synthesizer (each multiplied by its ``weight``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from zskd_lightning.errors import InvalidArgument
from zskd_lightning.pixels import to_pixels
from zskd_lightning.synthesis.base import Regularizer


class TotalVariation(Regularizer):
    """Anisotropic total variation per sample, ``[N]``: mean absolute difference of neighbouring pixels."""

    def __init__(self, weight: float = 1e-3) -> None:
        self.weight = float(weight)

    def __call__(self, inputs: Tensor) -> Tensor:
        dh = (inputs[..., 1:, :] - inputs[..., :-1, :]).abs().flatten(1).mean(1)
        dw = (inputs[..., :, 1:] - inputs[..., :, :-1]).abs().flatten(1).mean(1)
        return dh + dw


class L2Prior(Regularizer):
    """Mean squared input value per sample, ``[N]`` (keeps impressions from saturating)."""

    def __init__(self, weight: float = 1e-4) -> None:
        self.weight = float(weight)

    def __call__(self, inputs: Tensor) -> Tensor:
        return inputs.pow(2).flatten(1).mean(1)


class PixelL2Prior(Regularizer):
    """Sum of squared pixel values per image, ``[N]``, pixels mapped back to [0, 1] (0 = black) through the
    valid input range: pulls every pixel toward black, the background of digit-like data, so the class
    evidence the teacher needs is drawn as strokes on a dark ground. Without a known input range the inputs are
    taken as the pixels.

    Weight 5e-4 is about 0.5 per 32x32 image at the start. On MNIST LeNet-5 (2,000 impressions, students scored
    on the validation split) 5e-4 gave 81.9%, 1e-4 69.3% and 2e-3 65.5%.
    """

    def __init__(self, weight: float = 5e-4) -> None:
        self.weight = float(weight)
        self._range: tuple[Tensor, Tensor] | None = None

    def set_input_range(self, input_range: tuple[Tensor, Tensor] | None) -> None:
        self._range = input_range

    def __call__(self, inputs: Tensor) -> Tensor:
        return to_pixels(inputs, self._range).pow(2).flatten(1).sum(1)


class BatchNormStatistics(Regularizer):
    """DeepInversion's prior: the batch's per-channel mean/variance at every BatchNorm input should match the
    layer's running statistics. Returns a scalar: ``sum_l ||mu_l(x) - mu_l||_2 + ||var_l(x) - var_l||_2``.

    Needs a teacher with BatchNorm layers (``attach`` finds them); a batch-level statistic, so impressions in
    a chunk are coupled (still deterministic per chunk).
    """

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = float(weight)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._losses: list[Tensor] = []

    def attach(self, teacher: nn.Module) -> None:
        layers = [m for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not layers:
            raise InvalidArgument("BatchNormStatistics needs a teacher with BatchNorm layers; this one has none")
        self._handles = [layer.register_forward_hook(self._record) for layer in layers]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._losses = [], []

    def _record(self, module: nn.modules.batchnorm._BatchNorm, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        x = inputs[0].float()
        dims = [0] + list(range(2, x.ndim))
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        self._losses.append(
            torch.linalg.vector_norm(mean - module.running_mean) + torch.linalg.vector_norm(var - module.running_var)
        )

    def __call__(self, inputs: Tensor) -> Tensor:
        if not self._losses:
            return inputs.new_zeros(())
        total = torch.stack(self._losses).sum()
        self._losses = []
        return total

    def settings(self) -> dict[str, Any]:
        return {"name": type(self).__name__, "weight": self.weight}
