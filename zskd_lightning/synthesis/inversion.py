"""The inversion engine: Adam on the inputs themselves until the teacher's response matches the targets.

Used by every offline method (ZSKD, Class Impressions, Wang 2021): a method is a target sampler, an objective,
regularizers and optionally per-sample weights, handed to :class:`Synthesizer`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from zskd_lightning.errors import InvalidArgument
from zskd_lightning.pixels import from_pixels, pixel_noise
from zskd_lightning.synthesis.api import (
    Chunk,
    Method,
    Objective,
    ProgressFn,
    Regularizer,
    Response,
    SynthesisContext,
    SynthesisResult,
    TargetSampler,
    check_synthesis_precision,
)
from zskd_lightning.kernels import default_layout, fast_kernels_in, in_channels_last
from zskd_lightning.modes import evaluating
from zskd_lightning.synthesis.loss_scale import LossScale
from zskd_lightning.weighting import SampleWeighting

#: The noise starts other than ``"uniform"``: ``(mean, std)`` of the clamped normal in pixel space.
INITS = {"uniform": None, "normal": (0.0, 1.0), "gray": (0.5, 0.1)}


class Synthesizer(Method):
    """Optimize inputs from random noise with Adam until the teacher's response matches the sampled targets.

    Args:
        target_sampler: what each impression should make the teacher output.
        objective: per-sample loss to those targets.
        regularizers: input priors added to the loss (each has a ``weight``).
        sample_weights: per-sample weights of the objective (``None``: every impression counts once). Each
            impression is its own Adam variable and Adam's step is invariant to a constant gradient scale, so a
            weight here moves only the balance between that impression's objective and its regularizers.
        iterations: the most Adam steps an impression gets.
        lr: Adam learning rate on the inputs (betas 0.9, 0.999; eps 1e-8).
        init: ``"uniform"``: pixel values uniform in [0, 1] (noise over the valid input range); ``"normal"``:
            pixel values from a standard normal, clamped to [0, 1] (about half the pixels start black, a sixth
            white). ``"gray"``: low-contrast noise, pixel values from N(0.5, 0.1) clamped to [0, 1], so that what
            the optimization draws is not buried under the starting noise (a teacher indifferent to
            high-frequency noise leaves it in place). Without a known input range, a standard normal in the
            teacher's input space.
        stop_tolerance: stop optimizing an impression once its loss improved by less than this over the last
            ``stop_window`` iterations (a plateau); its input is then frozen and costs no more compute. In the
            units of the method's per-sample objective alone (its regularizers and sample weights are not in it,
            so an impression whose objective has flattened stops even while a prior term still falls): nats for
            ZSKD's cross-entropy, T^2 nats for a loss scaled by T^2 (Wang's ``matching_scale: t_squared``).
            ``None`` (default) runs every impression for all ``iterations`` (the paper's procedure). Refused
            beside a batch-level regularizer (``BatchNormStatistics``), which couples a chunk's impressions.
        stop_window: iterations between plateau checks.
        channels_last: run the teacher on channels-last (NHWC) inputs and weights during synthesis (a teacher
            that was contiguous is restored to it afterwards). Same arithmetic, different kernels: on 2 CPU cores
            (oneDNN) LeNet-5 synthesis ran 2.4x and AlexNet (with ``fast_kernels``) 1.4x faster with it.
        fast_kernels: while synthesizing, run the teacher's ``nn.LocalResponseNorm`` layers as an equivalent
            banded 1x1 convolution (:mod:`zskd_lightning.kernels`; equal up to float rounding,
            ~1.8x faster AlexNet synthesis steps on CPU).
        precision: the arithmetic of the teacher's forward/backward during synthesis. ``None`` (default): the
            context's (the Trainer's precision plugin's autocast, as for distillation; under float16, ``16-mixed``,
            the loss is scaled: :class:`~zskd_lightning.synthesis.LossScale`). ``"bf16-mixed"``: bf16
            autocast for synthesis only (on CPUs with native bf16, e.g. AVX512-BF16/AMX, and on GPUs); the
            inputs, their Adam moments, the objective and the regularizers stay float32. ``"32-true"``: float32.
        jitter: before every step, shift the whole chunk by a random offset of up to ``jitter`` pixels in each
            direction (circular, one offset per step from the chunk's random stream) before the teacher sees it;
            the gradient flows back to the unshifted inputs (the DeepInversion trick). 0 (default): off. Made for
            teachers trained with shift augmentation, which otherwise give impressions with strokes anywhere; on
            the full MNIST (students from 2,000 impressions, validation split, ``benchmarks/teacher_sources.py``,
            one seed) ``jitter=2`` helped a lightly augmented teacher (68.7% to 79.9%) and an unaugmented one
            (86.9% to 89.3%) alike. Image inputs ``[C, H, W]`` only.

    The loss minimized is the SUM over the chunk of the per-sample losses (times their weights, when given), so
    each impression's gradient does not depend on how many others share its chunk; Adam is applied per element
    (vectorised over the chunk). After every step the inputs are clamped to the valid range, when one is known.

    The cache identity (:meth:`identity`) is derived from the constructor's arguments and ``identity_name``.
    """

    identity_name = "synthesizer"

    def __init__(
        self,
        target_sampler: TargetSampler,
        objective: Objective,
        regularizers: Sequence[Regularizer] = (),
        sample_weights: SampleWeighting | None = None,
        iterations: int = 1500,
        lr: float = 0.01,
        init: Literal["uniform", "normal", "gray"] = "uniform",
        stop_tolerance: float | None = None,
        stop_window: int = 50,
        channels_last: bool = True,
        fast_kernels: bool = True,
        precision: Literal["bf16-mixed", "32-true"] | None = None,
        jitter: int = 0,
    ) -> None:
        if iterations < 1:
            raise InvalidArgument(f"iterations must be >= 1, got {iterations}")
        if not lr > 0:
            raise InvalidArgument(f"lr must be > 0, got {lr}")
        if stop_tolerance is not None and stop_tolerance <= 0:
            raise InvalidArgument(f"stop_tolerance must be > 0 or None, got {stop_tolerance}")
        if stop_window < 1:
            raise InvalidArgument(f"stop_window must be >= 1 iterations, got {stop_window}")
        check_synthesis_precision(precision)
        if jitter < 0:
            raise InvalidArgument(f"jitter must be >= 0 pixels, got {jitter}")
        if init not in INITS:
            raise InvalidArgument(f"init must be one of {list(INITS)}, got {init!r}")
        remembering = [type(r).__name__ for r in regularizers if r.across_rounds]
        if remembering:
            raise InvalidArgument(f"{', '.join(remembering)} remembers earlier generator rounds (a momentum): "
                                  "impression chunks are independent, so inversion takes it without one")
        coupled = [type(r).__name__ for r in regularizers if r.batch_level]
        if stop_tolerance is not None and coupled:
            raise InvalidArgument(f"stop_tolerance freezes impressions one by one, and {', '.join(coupled)} is a "
                                  "statistic of the whole chunk (the impressions still optimizing would be matched "
                                  "to it alone): use one or the other")
        self.target_sampler = target_sampler
        self.objective = objective
        self.regularizers = list(regularizers)
        self.sample_weights = sample_weights
        self.iterations = iterations
        self.lr = lr
        self.init = init
        self.stop_tolerance = stop_tolerance
        self.stop_window = stop_window
        self.channels_last = channels_last
        self.fast_kernels = fast_kernels
        self.precision = precision
        self.jitter = int(jitter)

    def setup(self, context: SynthesisContext) -> None:
        """Once per run, before any chunk: each part reads the context (e.g. the teacher's class similarity),
        drawing any randomness from ``(context.seed, "setup")`` so every rank computes the same."""
        self.setup_parts(context)

    def initial_inputs(self, n: int, context: SynthesisContext, generator: torch.Generator) -> Tensor:
        """Noise ``[n, *input_shape]`` (float32, CPU) drawn from ``generator``."""
        shape = (n, *context.input_spec.shape)
        input_range = context.input_range
        if input_range is None:
            return torch.randn(shape, generator=generator)
        if self.init == "uniform":
            pixels = torch.rand(shape, generator=generator)
        else:
            pixels = pixel_noise(shape, *INITS[self.init], generator)
        return from_pixels(pixels, input_range)

    def invert(self, context: SynthesisContext, chunk: Chunk, progress: ProgressFn | None = None) -> SynthesisResult:
        """Synthesize the impressions of ``chunk``.

        Input gradients are enabled here even inside ``torch.inference_mode()`` or ``torch.no_grad()`` blocks
        (Lightning's predict/validation contexts).
        """
        teacher, device, input_shape = context.teacher, torch.device(context.device), context.input_spec.shape
        if self.jitter and len(input_shape) != 3:
            raise InvalidArgument(f"jitter shifts images [C, H, W]; the teacher's input shape is {tuple(input_shape)}")
        # a FrozenTeacher(channels_last=False) keeps its layout (e.g. a network that .view()s its conv features)
        teacher_allows = getattr(teacher, "channels_last", True) is not False
        channels_last = self.channels_last and len(input_shape) == 3 and teacher_allows
        autocast = context.autocast_for(self.precision)
        student = self.student_for(context)
        indices, rng = chunk.indices, chunk.rng
        n = len(indices)
        input_range = context.input_range
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            _memory_format(teacher, channels_last),
            fast_kernels_in(teacher, self.fast_kernels),
            evaluating(student),
            self.feature_taps(context) as taps,
        ):
            # Made here, not above: tensors created under an outer inference_mode could never require grad.
            targets, labels = self.target_sampler.sample(chunk, context)
            inputs = self.initial_inputs(n, context, rng.torch)
            inputs = inputs.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            device_targets = targets.to(device)
            final_loss = torch.zeros(n, device=device)
            loss_at_last_check = torch.full((n,), math.inf, device=device)
            adam = _MaskedAdam(inputs, self.lr, None if input_range is None else tuple(b.to(device) for b in input_range))
            active = torch.arange(n, device=device)
            steps = 0
            loss_scale = LossScale.for_autocast(autocast, device)  # float16 only: gradients kept from underflow
            for iteration in range(1, self.iterations + 1):
                everyone = active.numel() == n
                offsets = self._offsets(rng.torch)

                def gradient(scale: float) -> tuple[list[Tensor], tuple[Tensor, Tensor]]:
                    current = (inputs if everyone else inputs.index_select(0, active)).detach().requires_grad_(True)
                    shifted = self._rolled(current, offsets)
                    with autocast():
                        logits = teacher(shifted)
                        # the student gets the layout it trains on (a .view() of its features would fail)
                        student_logits = None if student is None else student(default_layout(shifted))
                    response = Response(logits.float(), taps.features,
                                        None if student_logits is None else student_logits.float())
                    per_sample = self.objective(response, device_targets if everyone else device_targets[active])
                    loss = self.summed_loss(per_sample, self.weights_for(response), current, response)
                    grads = torch.autograd.grad(loss * scale if scale != 1.0 else loss, current)
                    taps.clear()
                    return list(grads), (current, per_sample)

                (grad,), (current, per_sample) = loss_scale.backward(gradient)
                adam.step(active, None if everyone else current.detach(), grad, everyone)
                steps += active.numel()
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
        return SynthesisResult(
            inputs=inputs.detach().float().cpu().contiguous(),
            targets=targets.float(),
            labels=labels.long(),
            loss=final_loss.float().cpu(),
            steps=steps,
        )

    def _offsets(self, generator: torch.Generator) -> tuple[int, int] | None:
        """One random ``(dy, dx)`` in ``[-jitter, jitter]`` for an iteration (``None`` when off)."""
        if not self.jitter:
            return None
        dy, dx = torch.randint(-self.jitter, self.jitter + 1, (2,), generator=generator).tolist()
        return dy, dx

    @staticmethod
    def _rolled(inputs: Tensor, offsets: tuple[int, int] | None) -> Tensor:
        """``inputs [N, C, H, W]`` rolled by ``offsets`` ``(dy, dx)`` pixels (itself for ``None``)."""
        if offsets is None:
            return inputs
        shifted = torch.roll(inputs, shifts=offsets, dims=(-2, -1))
        return shifted.contiguous(memory_format=torch.channels_last) if inputs.is_contiguous(
            memory_format=torch.channels_last) else shifted


@contextlib.contextmanager
def _memory_format(module: nn.Module, channels_last: bool):
    """Temporarily convert ``module``'s 4-d parameters and buffers to channels-last layout (a module already in
    it, e.g. a :class:`~zskd_lightning.FrozenTeacher` with ``channels_last``, is left as it is)."""
    if not channels_last or in_channels_last(module):
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
