"""Input priors that compose with any synthesis method (each multiplied by its ``weight``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from zskd_lightning.errors import InvalidArgument, ZSKDError
from zskd_lightning.pixels import InputRange, to_pixels
from zskd_lightning.synthesis.api import ChunkRandomness, Regularizer, Response, SynthesisContext
from zskd_lightning.taps import Tap


class TotalVariation(Regularizer):
    """Anisotropic total variation per sample, ``[N]``: the mean absolute difference of vertical neighbours plus
    that of horizontal neighbours (in the teacher's input space)."""

    def __init__(self, weight: float = 1e-3) -> None:
        self.weight = float(weight)

    def setup(self, context: SynthesisContext, rng: ChunkRandomness) -> None:
        shape = tuple(context.input_spec.shape)
        if len(shape) not in (2, 3) or min(shape[-2:]) < 2:  # [N, D] would take the batch for the vertical axis
            raise InvalidArgument(f"TotalVariation needs image inputs ([C, H, W] or [H, W], H and W >= 2), got input "
                                  f"shape {list(shape)}")

    def __call__(self, inputs: Tensor, response: Response) -> Tensor:
        dh = (inputs[..., 1:, :] - inputs[..., :-1, :]).abs().flatten(1).mean(1)
        dw = (inputs[..., :, 1:] - inputs[..., :, :-1]).abs().flatten(1).mean(1)
        return dh + dw


class L2Prior(Regularizer):
    """Mean squared input value per sample, ``[N]`` (keeps impressions from saturating)."""

    def __init__(self, weight: float = 1e-4) -> None:
        self.weight = float(weight)

    def __call__(self, inputs: Tensor, response: Response) -> Tensor:
        return inputs.pow(2).flatten(1).mean(1)


class PixelL2Prior(Regularizer):
    """Sum of squared pixel values per image, ``[N]``, pixels mapped back to [0, 1] (0 = black) through the
    valid input range: pulls every pixel toward black, the background of digit-like data, so the class
    evidence the teacher needs is drawn as strokes on a dark ground. Without a known input range the inputs are
    taken as the pixels.

    At weight 5e-4 an image of uniform pixel noise costs 5e-4 x 1024 / 3, about 0.17 per 1 x 32 x 32 image (0.5 in
    three channels); ``init: normal`` starts at about 0.13. On MNIST LeNet-5 (2,000 impressions, students scored
    on the validation split) 5e-4 gave 81.9%, 1e-4 69.3% and 2e-3 65.5%.
    """

    def __init__(self, weight: float = 5e-4) -> None:
        self.weight = float(weight)
        self._range: InputRange | None = None
        self._set_up = False  # the range is known only after setup (None there: the inputs are the pixels)

    def setup(self, context: SynthesisContext, rng: ChunkRandomness) -> None:
        self._range, self._set_up = context.input_range, True

    def __call__(self, inputs: Tensor, response: Response) -> Tensor:
        if not self._set_up:  # else normalized inputs would pass for pixels: pulled toward the mean, not black
            raise InvalidArgument("PixelL2Prior reads the input range at setup: call Synthesizer.setup(context) "
                                  "before inverting (the impression driver does)")
        return to_pixels(inputs, self._range).pow(2).flatten(1).sum(1)


class BatchNormStatistics(Regularizer):
    """DeepInversion's prior (Yin et al., CVPR 2020): the batch's per-channel mean/variance at every BatchNorm
    input should match the layer's running statistics. Returns a scalar:
    ``sum_l ||mu_l(x) - mu_l||_2 + ||var_l(x) - var_l||_2`` over the layers in the order they run.

    Needs a teacher with BatchNorm layers (it taps their inputs); a batch-level statistic, so impressions in a
    chunk are coupled (still deterministic per chunk). The inversion loop multiplies it by the number of
    impressions in the chunk, so ``weight`` is relative to ONE impression's matching loss whatever the chunk size.

    Default weight 0.01 (the order of DeepInversion's public feature-statistics weight next to a batch-mean
    cross-entropy). Measured (``python benchmarks/bn_prior.py``: a BatchNorm digits teacher, students on the
    validation split, chunks of 50 and 400): weights 0, 0.01, 0.1 and 1 all gave 97.2-98.6%, 0 and 0.01 the best
    at 50 (98.61%); no weight helped that teacher, whose impressions already teach 98.6%, so the default rests
    on the scale argument. Used in the configs of BatchNorm teachers.
    """

    batch_level = True

    def __init__(self, weight: float = 0.01) -> None:
        self.weight = float(weight)
        self._layers: list[tuple[Tap, nn.modules.batchnorm._BatchNorm]] = []

    def taps(self, network: nn.Module) -> Sequence[Tap]:
        self._layers = [(Tap(name, "input"), m) for name, m in network.named_modules()
                        if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not self._layers:
            raise InvalidArgument("BatchNormStatistics needs a teacher with BatchNorm layers; this one has none")
        for tap, layer in self._layers:
            if layer.running_mean is None or layer.running_var is None:
                raise InvalidArgument(f"BatchNormStatistics needs running statistics at every BatchNorm layer; "
                                      f"{tap.path!r} ({type(layer).__name__}) has none (track_running_stats=False)")
        return [tap for tap, _ in self._layers]

    def __call__(self, inputs: Tensor, response: Response) -> Tensor:
        layers = {tap.key: layer for tap, layer in self._layers}
        losses = []
        for key in [k for k in response.features if k in layers]:  # in the order the layers ran
            layer, x = layers[key], response.features[key].float()
            dims = [0] + list(range(2, x.ndim))
            mean, var = self._matched(key, x.mean(dims), x.var(dims, unbiased=False))
            losses.append(torch.linalg.vector_norm(mean - layer.running_mean)
                          + torch.linalg.vector_norm(var - layer.running_var))
        return torch.stack(losses).sum() if losses else inputs.new_zeros(())

    def _matched(self, key: str, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        """The statistics matched to layer ``key``'s running ones, from the batch's ``mean, var [C]``."""
        return mean, var


class BatchNormStatisticsWithMomentum(BatchNormStatistics):
    """:class:`BatchNormStatistics` for generator rounds with a memory of earlier rounds (FastDFKD's ``bn_mmt``,
    Fang et al., AAAI 2022; 0.9 in its code): each layer's matched statistics are ``(1 - m) x`` the batch's ``+
    m x`` the memory, so a round need not match the running statistics with its one batch alone. The memory is
    the first round's last-step batch statistics, then ``m x memory + (1 - m) x`` each later round's (under
    DDP pooled over the processes' equal batches: mean of means, and the variance from the mean second moment,
    so the spread between the processes' means counts); the first round matches its batch alone. In checkpoints
    through the generator synthesizer's state; the impression engine refuses it (its chunks are independent).
    """

    def __init__(self, weight: float = 0.01, momentum: float = 0.9) -> None:
        if not 0 <= momentum < 1:
            raise InvalidArgument(f"BatchNormStatisticsWithMomentum momentum must be in [0, 1), got {momentum}")
        super().__init__(weight)
        self.momentum = float(momentum)
        self.memory: dict[str, tuple[Tensor, Tensor]] | None = None  # layer key -> (mean [C], var [C]), float32
        self._latest: dict[str, tuple[Tensor, Tensor]] = {}  # the last call's batch statistics (detached)

    @property
    def across_rounds(self) -> bool:
        return True

    def setup(self, context: SynthesisContext, rng: ChunkRandomness) -> None:
        self.memory, self._latest = None, {}  # a new run remembers no earlier run's rounds

    def _matched(self, key: str, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        self._latest[key] = (mean.detach(), var.detach())
        if self.memory is None or key not in self.memory:
            return mean, var
        remembered_mean, remembered_var = self.memory[key]
        m = self.momentum
        return (1 - m) * mean + m * remembered_mean, (1 - m) * var + m * remembered_var

    def end_round(self, average: Callable[[list[Tensor]], None] | None) -> None:
        """Blend the round's last batch statistics into the memory."""
        if not self._latest:
            return
        keys = sorted(self._latest)  # the same order on every process
        if average is None:  # one process: its batch's own statistics
            fresh = {key: self._latest[key] for key in keys}
        else:  # mean and second moment, float64 against cancellation, pooled in place over the processes
            moments = [t for key in keys for mean, var in [self._latest[key]]
                       for t in (mean.double(), var.double() + mean.double().square())]
            average(moments)
            fresh = {key: (mean.float(), (second - mean.square()).clamp_min(0).float())
                     for key, mean, second in zip(keys, moments[0::2], moments[1::2], strict=True)}
        self._latest = {}
        if self.memory is None:
            self.memory = fresh
        else:  # new tensors: a saved state (a round's start) keeps the memory it held
            m = self.momentum
            self.memory = {key: tuple(m * old + (1 - m) * new for old, new in zip(self.memory[key], fresh[key]))
                           if key in self.memory else fresh[key] for key in fresh}

    def state_dict(self) -> dict[str, Any]:
        if self.memory is None:
            return {}
        return {"memory": {key: {"mean": mean, "var": var} for key, (mean, var) in self.memory.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the memory (after setup: checked against the teacher's BatchNorm layers, moved to their
        device). It holds the layers that ran (a BatchNorm off the forward path, e.g. an auxiliary head's, has
        none), so each must be one of the teacher's, with its channels."""
        memory = state.get("memory")
        if memory is None:
            self.memory = None
            return
        channels = {tap.key: tuple(layer.running_mean.shape) for tap, layer in self._layers}
        found = {key: tuple(value["mean"].shape) for key, value in memory.items()}
        if not found or any(channels.get(key) != shape for key, shape in found.items()):
            raise ZSKDError(f"the checkpoint's BatchNorm memory is for layers {found}, this teacher's BatchNorm "
                            f"inputs are {channels}: resume with its teacher")
        device = self._layers[0][1].running_mean.device  # the teacher's
        self.memory = {key: (value["mean"].to(device).float().clone(), value["var"].to(device).float().clone())
                       for key, value in memory.items()}
