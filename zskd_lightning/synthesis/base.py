"""The synthesizer interface: a target sampler, an objective, composable regularizers, and one optimizer loop.

A *synthesizer* turns a frozen teacher into inputs ("impressions"). Work comes in chunks of global impression
indices; everything random about a chunk is drawn from a :class:`ChunkRandomness` made from ``(seed, chunk)``
alone, so a cache is identical whichever device or rank synthesized which chunk.

Shapes: ``indices [N]``; ``targets [N, ...]`` (soft labels ``[N, num_classes]`` for the label-matching
methods); ``inputs [N, C, H, W]`` in the teacher's input space (after its normalization).
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from zskd_lightning.errors import InvalidArgument
from zskd_lightning.pixels import from_pixels
from zskd_lightning.synthesis.kernels import fast_synthesis_kernels

SYNTHESIS_PRECISIONS = (None, "bf16-mixed", "32-true")
ProgressFn = Callable[[int, float], None]
"""Called as ``progress(iteration, mean_loss)`` every few iterations (for progress bars)."""


@dataclass
class ChunkRandomness:
    """Independent random streams for one chunk, derived from ``(seed, chunk_index)`` only.

    ``numpy`` serves the target samplers (Dirichlet/Gaussian draws); ``torch`` the input initialisation.
    """

    numpy: np.random.Generator
    torch: torch.Generator

    @classmethod
    def for_chunk(cls, seed: int, chunk_index: int) -> ChunkRandomness:
        sequence = np.random.SeedSequence([int(seed), int(chunk_index)])
        numpy_seq, torch_seq = sequence.spawn(2)
        torch_gen = torch.Generator(device="cpu")
        torch_gen.manual_seed(int(torch_seq.generate_state(1, np.uint64)[0] & 0x7FFF_FFFF_FFFF_FFFF))
        return cls(numpy=np.random.default_rng(numpy_seq), torch=torch_gen)


class TargetSampler(ABC):
    """Draws what each impression should make the teacher output."""

    def setup(self, teacher: nn.Module) -> None:
        """Precompute from the (frozen) teacher, e.g. class similarity. Called once before synthesis."""

    @abstractmethod
    def sample(self, indices: Tensor, num_classes: int, rng: ChunkRandomness) -> tuple[Tensor, Tensor]:
        """Return ``(targets [N, ...] float32, labels [N] int64)``: the targets and the class each was drawn for."""

    def settings(self) -> dict[str, Any]:
        """Everything that changes the samples (recorded in the cache's manifest)."""
        return {"name": type(self).__name__}


class Objective(ABC):
    """Per-sample loss between the teacher's response to the inputs and the targets (lower is better)."""

    def attach(self, teacher: nn.Module) -> None:
        """Register hooks on the teacher if the objective needs intermediate activations."""

    def detach(self) -> None:
        """Remove what :meth:`attach` registered."""

    @abstractmethod
    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        """``logits [N, num_classes]``, ``targets [N, ...]`` -> loss ``[N]``."""

    def settings(self) -> dict[str, Any]:
        return {"name": type(self).__name__}


class Regularizer(ABC):
    """A prior on the inputs, added to the objective with weight ``weight``. Regularizers compose (a list)."""

    weight: float = 1.0

    def attach(self, teacher: nn.Module) -> None:
        """Register hooks on the teacher (e.g. BatchNorm statistics)."""

    def detach(self) -> None:
        """Remove what :meth:`attach` registered."""

    def set_input_range(self, input_range: tuple[Tensor, Tensor] | None) -> None:
        """Receive the valid input range (per-channel ``(low, high)``, each ``[C, 1, 1]``: where pixel values 0 and
        1 land after the teacher's normalization), or ``None`` when unknown. Called before each synthesis."""

    @abstractmethod
    def __call__(self, inputs: Tensor) -> Tensor:
        """``inputs [N, C, H, W]`` -> penalty ``[N]`` (per sample) or a scalar (a batch statistic)."""

    def settings(self) -> dict[str, Any]:
        return {"name": type(self).__name__, "weight": self.weight}


class Synthesizer:
    """Optimize inputs from random noise with Adam until the teacher's response matches the sampled targets.

    Args:
        target_sampler: what each impression should make the teacher output.
        objective: per-sample loss to those targets.
        regularizers: input priors added to the loss (each has a ``weight``).
        iterations: the most Adam steps an impression gets.
        lr: Adam learning rate on the inputs (betas 0.9, 0.999; eps 1e-8).
        init: ``"uniform"``: pixel values uniform in [0, 1] (noise over the valid input range); ``"normal"``:
            pixel values from a standard normal, clamped to [0, 1] (about half the pixels start black, a sixth
            white). Without a known input range, a standard normal in the teacher's input space.
        stop_tolerance: stop optimizing an impression once its loss improved by less than this many nats over
            the last ``stop_window`` iterations (a plateau); its input is then frozen and costs no more compute.
            ``None`` (default) runs every impression for all ``iterations`` (the paper's procedure).
        stop_window: iterations between plateau checks.
        channels_last: run the teacher on channels-last (NHWC) inputs and weights during synthesis (the teacher
            is restored to contiguous layout afterwards). Same arithmetic, different kernels: on 2 CPU cores
            (oneDNN) LeNet-5 synthesis ran 2.4x and AlexNet (with ``fast_kernels``) 1.4x faster with it.
        fast_kernels: while synthesizing, run the teacher's ``nn.LocalResponseNorm`` layers as an equivalent
            banded 1x1 convolution (:mod:`zskd_lightning.synthesis.kernels`; equal up to float rounding,
            ~1.8x faster AlexNet synthesis steps on CPU).
        precision: the arithmetic of the teacher's forward/backward during synthesis. ``None`` (default): the
            Trainer's (its precision plugin's autocast, as for distillation). ``"bf16-mixed"``: bf16 autocast for
            synthesis only, whatever the Trainer uses (on CPUs with native bf16, e.g. AVX512-BF16/AMX, and on
            GPUs); the inputs, their Adam moments, the objective and the regularizers stay float32.
            ``"32-true"``: float32 throughout. An explicit value is part of the cache's settings.
        jitter: before every step, shift the whole chunk by a random offset of up to ``jitter`` pixels in each
            direction (circular, one offset per step from the chunk's random stream) before the teacher sees it;
            the gradient flows back to the unshifted inputs (the DeepInversion trick). 0 (default): off. For
            teachers trained with shift augmentation, which otherwise give impressions with strokes anywhere. On
            MNIST (students from 2,000 impressions, validation split, ``benchmarks/teacher_sources.py``) ``jitter=2``
            took a teacher trained with 2-pixel shifts from 86.8% to 90.9%, and cost the shipped no-augmentation
            teacher 1.3 points (95.9% to 94.6%).
            Image inputs ``[C, H, W]`` only. A non-zero value is part of the cache's settings.

    The loss minimized is the SUM over the chunk of the per-sample losses, so each impression's gradient does
    not depend on how many others share its chunk; Adam is applied per element (vectorised over the chunk).
    After every step the inputs are clamped to the valid range (the teacher's normalization of pixel values in
    [0, 1]), when one is known.
    """

    name = "synthesizer"

    def __init__(
        self,
        target_sampler: TargetSampler,
        objective: Objective,
        regularizers: Sequence[Regularizer] = (),
        iterations: int = 1500,
        lr: float = 0.01,
        init: Literal["uniform", "normal"] = "uniform",
        stop_tolerance: float | None = None,
        stop_window: int = 50,
        channels_last: bool = True,
        fast_kernels: bool = True,
        precision: Literal["bf16-mixed", "32-true"] | None = None,
        jitter: int = 0,
    ) -> None:
        if iterations < 1:
            raise InvalidArgument(f"iterations must be >= 1, got {iterations}")
        if stop_tolerance is not None and stop_tolerance <= 0:
            raise InvalidArgument(f"stop_tolerance must be > 0 or None, got {stop_tolerance}")
        if precision not in SYNTHESIS_PRECISIONS:
            raise InvalidArgument(f"precision must be one of {SYNTHESIS_PRECISIONS}, got {precision!r}")
        if jitter < 0:
            raise InvalidArgument(f"jitter must be >= 0 pixels, got {jitter}")
        self.target_sampler = target_sampler
        self.objective = objective
        self.regularizers = list(regularizers)
        self.iterations = iterations
        self.lr = lr
        self.init = init
        self.stop_tolerance = stop_tolerance
        self.stop_window = stop_window
        self.channels_last = channels_last
        self.fast_kernels = fast_kernels
        self.precision = precision
        self.jitter = int(jitter)
        self.last_steps = 0  # impression-iterations spent by the last synthesize() call

    def settings(self) -> dict[str, Any]:
        """Every setting that changes the impressions (the cache refuses to mix different settings)."""
        settings = {
            "name": self.name,
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "target_sampler": self.target_sampler.settings(),
            "objective": self.objective.settings(),
            "regularizers": [r.settings() for r in self.regularizers],
            "iterations": self.iterations,
            "lr": self.lr,
            "init": self.init,
            "stop_tolerance": self.stop_tolerance,
            "stop_window": self.stop_window if self.stop_tolerance is not None else None,
            "channels_last": self.channels_last,
            "fast_kernels": self.fast_kernels,
        }
        if self.precision is not None:  # only when explicit: caches made before the option keep their key
            settings["precision"] = self.precision
        if self.jitter:  # likewise only when on
            settings["jitter"] = self.jitter
        return settings

    def setup(self, teacher: nn.Module) -> None:
        """Once per run, before any chunk: let the target sampler read the teacher."""
        self.target_sampler.setup(teacher)

    def initial_inputs(self, n: int, input_shape: Sequence[int], input_range: tuple[Tensor, Tensor] | None,
                       generator: torch.Generator) -> Tensor:
        """Noise ``[n, *input_shape]`` (float32, CPU) drawn from ``generator``."""
        shape = (n, *input_shape)
        if input_range is None:
            return torch.randn(shape, generator=generator)
        if self.init == "normal":
            pixels = torch.randn(shape, generator=generator).clamp_(0.0, 1.0)
        else:
            pixels = torch.rand(shape, generator=generator)
        return from_pixels(pixels, input_range)

    def synthesize(
        self,
        teacher: nn.Module,
        indices: Tensor,
        input_shape: Sequence[int],
        rng: ChunkRandomness,
        num_classes: int,
        input_range: tuple[Tensor, Tensor] | None = None,
        device: torch.device | str = "cpu",
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        progress: ProgressFn | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, float]:
        """Synthesize the impressions with global ``indices [N]``.

        Returns ``(inputs [N, *input_shape] float32 CPU, targets [N, ...] float32 CPU, labels [N] int64 CPU,
        final mean loss)``; ``self.last_steps`` holds the impression-iterations spent. Input gradients are
        enabled here even inside ``torch.inference_mode()`` or ``torch.no_grad()`` blocks (Lightning's
        predict/validation contexts).
        """
        device = torch.device(device)
        if self.jitter and len(input_shape) != 3:
            raise InvalidArgument(f"jitter shifts images [C, H, W]; the teacher's input shape is {tuple(input_shape)}")
        channels_last = self.channels_last and len(input_shape) == 3
        if self.precision == "bf16-mixed":
            autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
        elif self.precision == "32-true":
            autocast = contextlib.nullcontext
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            _memory_format(teacher, channels_last),
            fast_synthesis_kernels(teacher, self.fast_kernels),
        ):
            # Made here, not above: tensors created under an outer inference_mode could never require grad.
            targets, labels = self.target_sampler.sample(indices, num_classes, rng)
            inputs = self.initial_inputs(len(indices), input_shape, input_range, rng.torch)
            inputs = inputs.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            device_targets = targets.to(device)
            final_loss = torch.zeros(len(indices), device=device)
            loss_at_last_check = torch.full((len(indices),), math.inf, device=device)
            adam = _MaskedAdam(inputs, self.lr, None if input_range is None else tuple(b.to(device) for b in input_range))
            active = torch.arange(len(indices), device=device)
            hooked = [self.objective, *self.regularizers]
            self.last_steps = 0
            try:
                for reg in self.regularizers:
                    reg.set_input_range(input_range)
                for part in hooked:
                    part.attach(teacher)
                for iteration in range(1, self.iterations + 1):
                    everyone = active.numel() == len(indices)
                    current = (inputs if everyone else inputs.index_select(0, active)).detach().requires_grad_(True)
                    with autocast():
                        logits = teacher(self._shifted(current, rng.torch))
                    per_sample = self.objective(logits.float(), device_targets if everyone else device_targets[active])
                    loss = per_sample.sum()
                    for reg in self.regularizers:
                        penalty = reg(current)
                        loss = loss + reg.weight * (penalty.sum() if penalty.ndim else penalty * len(current))
                    (grad,) = torch.autograd.grad(loss, current)
                    adam.step(active, None if everyone else current.detach(), grad, everyone)
                    self.last_steps += active.numel()
                    per_sample = per_sample.detach()
                    final_loss.index_copy_(0, active, per_sample)
                    if progress is not None and (iteration % 25 == 0 or iteration == self.iterations):
                        progress(iteration, float(final_loss.mean()))
                    if self.stop_tolerance is not None and iteration % self.stop_window == 0:
                        improving = loss_at_last_check[active] - per_sample >= self.stop_tolerance
                        loss_at_last_check.index_copy_(0, active, per_sample)
                        active = active[improving]
                        if active.numel() == 0:
                            break
            finally:
                for part in hooked:
                    part.detach()
        return inputs.detach().float().cpu().contiguous(), targets.float(), labels.long(), float(final_loss.mean())

    def _shifted(self, inputs: Tensor, generator: torch.Generator) -> Tensor:
        """``inputs [N, C, H, W]`` rolled by one random ``(dy, dx)`` in ``[-jitter, jitter]`` (itself when off)."""
        if not self.jitter:
            return inputs
        dy, dx = torch.randint(-self.jitter, self.jitter + 1, (2,), generator=generator).tolist()
        shifted = torch.roll(inputs, shifts=(dy, dx), dims=(-2, -1))
        return shifted.contiguous(memory_format=torch.channels_last) if inputs.is_contiguous(
            memory_format=torch.channels_last) else shifted


@contextlib.contextmanager
def _memory_format(module: nn.Module, channels_last: bool):
    """Temporarily convert ``module``'s 4-d parameters and buffers to channels-last layout."""
    if not channels_last:
        yield
        return
    module.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        module.to(memory_format=torch.contiguous_format)


class _MaskedAdam:
    """Adam on the rows ``active`` of one tensor (rows = impressions); other rows keep their values and moments.

    Every active row has taken the same number of steps (rows only ever leave the active set), so one step
    counter serves all. Optionally clamps updated rows to ``bounds`` (per-channel min/max ``[C, 1, 1]``).
    """

    def __init__(self, inputs: Tensor, lr: float, bounds: tuple[Tensor, Tensor] | None,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.inputs, self.lr, self.bounds, self.betas, self.eps = inputs, lr, bounds, betas, eps
        self.exp_avg = torch.zeros_like(inputs)
        self.exp_avg_sq = torch.zeros_like(inputs)
        self.t = 0

    @torch.no_grad()
    def step(self, active: Tensor, active_inputs: Tensor | None, grad: Tensor, everyone: bool) -> None:
        beta1, beta2 = self.betas
        self.t += 1
        if everyone:
            x, m, v = self.inputs, self.exp_avg, self.exp_avg_sq
        else:
            x, m, v = active_inputs, self.exp_avg[active], self.exp_avg_sq[active]
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denominator = (v / (1 - beta2**self.t)).sqrt_().add_(self.eps)
        x.addcdiv_(m, denominator, value=-self.lr / (1 - beta1**self.t))
        if self.bounds is not None:
            x.clamp_(min=self.bounds[0], max=self.bounds[1])
        if not everyone:
            self.inputs.index_copy_(0, active, x)
            self.exp_avg.index_copy_(0, active, m)
            self.exp_avg_sq.index_copy_(0, active, v)
