"""The generator engine: a network that maps noise to inputs, trained in rounds on the same criteria as inversion.

Inversion (:mod:`zskd_lightning.synthesis.inversion`) optimizes each input itself; the generator family
(DAFL, FastDFKD, SSD-KD) optimizes a generator instead, a few steps per round, and keeps its output. Each round
draws its noise and classes from a :class:`~zskd_lightning.synthesis.api.Chunk` (its random streams come from
``(seed, chunk)``), takes ``steps_per_round`` Adam steps on the generator, and returns the batch the last step
generated. Online drivers (:mod:`zskd_lightning.online`) call :meth:`GeneratorSynthesizer.round` during
distillation; nothing here knows Lightning, ranks or files (processes agree through an ``average`` function).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zskd_lightning.augment import shift_and_flip
from zskd_lightning.errors import InvalidArgument, ZSKDError
from zskd_lightning.kernels import default_layout
from zskd_lightning.pixels import InputRange, from_pixels, to_pixels
from zskd_lightning.synthesis.api import (
    Autocast,
    Chunk,
    ChunkRandomness,
    Method,
    Objective,
    Regularizer,
    Response,
    SynthesisContext,
    SynthesisResult,
    TargetSampler,
    check_synthesis_precision,
)
from zskd_lightning.modes import evaluating
from zskd_lightning.randomness import stream_seed
from zskd_lightning.synthesis.loss_scale import LossScale
from zskd_lightning.synthesis.objectives import SoftTargetCrossEntropy
from zskd_lightning.synthesis.targets import OneHotTargets
from zskd_lightning.taps import FeatureTaps
from zskd_lightning.weighting import SampleWeighting

ADAM_BETAS = (0.5, 0.999)
"""The betas of every Adam here (the generator's, its learned noise's, its meta weights'): the DCGAN choice."""

CrossProcessMean = Callable[[list[Tensor]], None]
"""Averages a list of tensors across processes in place (never called on one process)."""


class ImageGenerator(nn.Module):
    """A DCGAN-like generator (Radford et al. 2016, as the FastDFKD family uses it) for ``[C, H, W]`` inputs with
    ``H`` and ``W`` divisible by 4 (MNIST and CIFAR at 32 px).

    ``noise [N, noise_dim]`` (and, when ``num_classes`` is given, ``labels [N]`` as a one-hot appended to the
    noise) -> linear -> ``[2 width, H/4, W/4]`` -> BN -> (transposed conv 4x4 stride 2 -> BN -> LeakyReLU) twice
    -> conv3x3 -> sigmoid: pixel values in [0, 1], mapped into the teacher's input space by ``input_range``
    (per-channel ``(low, high)`` ``[C, 1, 1]``), so every output is in the valid range by construction (float32,
    under autocast too). Without a range the output is ``tanh``, in [-1, 1]. Runs channels-last (2-3x faster steps
    on CPU than contiguous).
    """

    def __init__(self, input_shape: Sequence[int], noise_dim: int = 100, width: int = 64,
                 num_classes: int | None = None, input_range: InputRange | None = None) -> None:
        super().__init__()
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 3 or shape[1] % 4 or shape[2] % 4:
            raise InvalidArgument(f"ImageGenerator makes [C, H, W] inputs with H and W divisible by 4, got {shape}")
        if noise_dim < 1 or width < 1:
            raise InvalidArgument(f"noise_dim and width must be >= 1, got {noise_dim} and {width}")
        channels, height, width_px = shape
        self.input_shape, self.noise_dim, self.num_classes = shape, noise_dim, num_classes
        self.start = (2 * width, height // 4, width_px // 4)
        self.project = nn.Linear(noise_dim + (num_classes or 0), 2 * width * (height // 4) * (width_px // 4))
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * width),
            nn.ConvTranspose2d(2 * width, 2 * width, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, channels, 3, padding=1),
        )
        if input_range is not None:
            self.register_buffer("low", input_range[0].detach().clone().float(), persistent=False)
            self.register_buffer("high", input_range[1].detach().clone().float(), persistent=False)
        self.has_range = input_range is not None
        self.to(memory_format=torch.channels_last)

    def forward(self, noise: Tensor, labels: Tensor | None = None) -> Tensor:
        """``noise [N, noise_dim]`` (``labels [N]`` int64 when conditional) -> inputs ``[N, C, H, W]``."""
        if self.num_classes:
            if labels is None:
                raise InvalidArgument("this generator is conditional: pass the labels [N] of the classes to make")
            noise = torch.cat([noise, F.one_hot(labels, self.num_classes).to(noise.dtype)], dim=1)
        x = self.body(self.project(noise).view(-1, *self.start).contiguous(memory_format=torch.channels_last))
        x = x.float()  # under bf16 autocast too: a bf16 map into the range overshoots it (2.8215 -> 2.828)
        if not self.has_range:
            return torch.tanh(x)
        return from_pixels(torch.sigmoid(x), (self.low, self.high))


class GeneratorSynthesizer(Method):
    """Train a generator on a method's criteria, a few steps per round (the FastDFKD family's "how").

    Each round makes ``batch_size`` inputs: classes from ``target_sampler`` (default one-hot, class
    ``index mod K``, so a round is class-balanced), noise from the round's stream, ``steps_per_round`` Adam steps
    on the generator to lower ``mean_i w_i * objective_i + sum_r weight_r * regularizer_r`` (per-sample
    regularizers batch-averaged, so weights mean what they do in inversion), then the inputs of the last step.
    With ``augment_shift`` / ``augment_flip`` each step's teacher (and student) sees the generated batch shifted
    and flipped at random (FastDFKD's random crop with 4-pixel padding and horizontal flip), so the generator is
    trained on what survives those moves; the inputs kept are the generator's own, unmoved, and their labels,
    losses and weights are read from them by one more pass without gradients.

    Args:
        objective: per-sample loss of the teacher's response to the round's targets (default: cross-entropy to
            the one-hot class at T = 1, DAFL's and FastDFKD's).
        regularizers: terms on the batch and the teacher's (and student's) response, e.g. BatchNorm statistics,
            :class:`~zskd_lightning.synthesis.response_terms.Disagreement`.
        sample_weights: per-sample weights of the objective (SSD-KD's modulating function); ``None``: all alike.
        target_sampler: the round's classes and targets.
        batch_size: inputs per round per process.
        steps_per_round: generator steps each round (FastDFKD's "Fast-N").
        lr: Adam learning rate of the generator (betas ``(0.5, 0.999)``, the DCGAN choice).
        noise_dim / width / conditional: of :class:`ImageGenerator` (``conditional``: the class is an input too).
        noise_lr: the round's noise is learned too, by its own Adam at this rate (betas ``(0.5, 0.999)``, fresh
            each round), beside the generator's steps: FastDFKD's latent code (its ``lr_z``, 0.015 beside a
            generator lr of 5e-3 on CIFAR), which lets an unconditional generator move each noise towards the
            class drawn for it. ``None`` (default): the noise stays as drawn. Each process learns its own noise
            (its gradients are not averaged across processes; the generator's are).
        reptile_lr: FastDFKD's meta-learned start: each round begins from the meta generator with a fresh
            optimizer, and afterwards the meta weights move ``reptile_lr`` of the way to the round's result
            (Reptile, Nichol et al. 2018). ``None``: one generator keeps learning across rounds.
        meta_optimizer: the meta-learned start stepped by Adam (betas ``(0.5, 0.999)``) at ``lr x
            steps_per_round``, as FastDFKD's code does, instead of by ``reptile_lr``'s interpolation (give one of
            the two): ``"reptile"`` takes ``meta - fast`` as its gradient, ``"fomaml"`` (first-order MAML,
            Finn et al. 2017; FastDFKD's default) the sum of the round's generator gradients. BatchNorm's running
            statistics follow the round's generator. ``None`` (default): no Adam meta step.
        keep: which step's inputs a round returns: ``"last"`` (default), or ``"lowest_loss"``, those of the step
            whose batch loss (objective and regularizers, before that step's update) was lowest, as FastDFKD's
            code keeps them; under several processes each picks from its own batch's losses.
        augment_shift: the largest shift in whole pixels of each input, drawn per input and step, before the
            teacher and student see it (areas moved in are black); 0 (default): none. FastDFKD: 4 (a random crop
            of the input padded by 4 pixels), with ``augment_flip``
            (:func:`~zskd_lightning.augment.shift_and_flip`, a gather: gradients reach the generator).
        augment_flip: mirror each input left-right with probability 1/2, drawn per input and step, before the
            teacher and student see it. The moves are drawn from the chunk's stream (a retried float16 step
            redoes the same ones; the global generators do not move).
        labels_from_teacher: label each returned input with the teacher's argmax on it (for objectives that
            ignore the sampled classes, e.g. DAFL's one-hot loss) instead of the sampled class.
        precision: the arithmetic of the generator's and the networks' passes in a round (see
            :meth:`~zskd_lightning.synthesis.api.SynthesisContext.autocast_for`). ``None`` (default): the
            Trainer's (under float16, ``16-mixed``, with a scaled loss: :class:`~zskd_lightning.synthesis.LossScale`);
            ``"bf16-mixed"``: bf16 autocast for synthesis only (weights, Adam state, inputs, losses and
            regularizers stay float32; on 2 AMX CPU cores a width-32 MNIST generator step ran 2.3x faster,
            ``benchmarks/synthesis_throughput.py``); ``"32-true"``: float32.
    """

    identity_name = "generator"

    def __init__(
        self,
        objective: Objective | None = None,
        regularizers: Sequence[Regularizer] = (),
        sample_weights: SampleWeighting | None = None,
        target_sampler: TargetSampler | None = None,
        batch_size: int = 256,
        steps_per_round: int = 2,
        lr: float = 1e-3,
        noise_dim: int = 100,
        width: int = 64,
        conditional: bool = False,
        reptile_lr: float | None = None,
        labels_from_teacher: bool = False,
        precision: Literal["bf16-mixed", "32-true"] | None = None,
        noise_lr: float | None = None,
        meta_optimizer: Literal["reptile", "fomaml"] | None = None,
        keep: Literal["last", "lowest_loss"] = "last",
        augment_shift: int = 0,
        augment_flip: bool = False,
    ) -> None:
        for name, value in (("batch_size", batch_size), ("steps_per_round", steps_per_round)):
            if value < 1:
                raise InvalidArgument(f"{name} must be >= 1, got {value}")
        if not lr > 0:
            raise InvalidArgument(f"lr must be > 0, got {lr}")
        check_synthesis_precision(precision)
        if reptile_lr is not None and not 0 < reptile_lr <= 1:
            raise InvalidArgument(f"reptile_lr must be in (0, 1] or None, got {reptile_lr}")
        if meta_optimizer not in (None, "reptile", "fomaml"):
            raise InvalidArgument(f"meta_optimizer must be 'reptile', 'fomaml' or None, got {meta_optimizer!r}")
        if meta_optimizer is not None and reptile_lr is not None:
            raise InvalidArgument(f"give reptile_lr (the meta weights interpolated) or meta_optimizer (an Adam meta "
                                  f"step), not both: got reptile_lr={reptile_lr}, meta_optimizer={meta_optimizer!r}")
        if keep not in ("last", "lowest_loss"):
            raise InvalidArgument(f"keep must be 'last' or 'lowest_loss', got {keep!r}")
        if noise_lr is not None and not noise_lr > 0:
            raise InvalidArgument(f"noise_lr must be > 0 or None, got {noise_lr}")
        if isinstance(augment_shift, bool) or not isinstance(augment_shift, int) or augment_shift < 0:
            raise InvalidArgument(f"augment_shift must be a whole number of pixels >= 0, got {augment_shift!r}")
        self.objective = objective if objective is not None else SoftTargetCrossEntropy(temperature=1.0)
        self.regularizers = list(regularizers)
        self.sample_weights = sample_weights
        self.target_sampler = target_sampler if target_sampler is not None else OneHotTargets()
        self.batch_size, self.steps_per_round, self.lr = int(batch_size), int(steps_per_round), float(lr)
        self.noise_dim, self.width, self.conditional = int(noise_dim), int(width), bool(conditional)
        self.reptile_lr = reptile_lr
        self.meta_rule = meta_optimizer
        self.keep = keep
        self.meta_adam: torch.optim.Optimizer | None = None
        self.noise_lr = None if noise_lr is None else float(noise_lr)
        self.labels_from_teacher = bool(labels_from_teacher)
        self.precision = precision
        self.augment_shift, self.augment_flip = int(augment_shift), bool(augment_flip)
        self.generator: ImageGenerator | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.meta_state: dict[str, Tensor] | None = None
        self.loss_scale: LossScale | None = None  # float16 rounds only; kept across rounds, in checkpoints

    @torch.inference_mode(False)  # the generator's weights are trained: they cannot be inference tensors
    def setup(self, context: SynthesisContext) -> None:
        """Build the generator (weights from ``(seed, "setup")``, so every rank starts alike) on the context's
        device, its optimizer, and the parts."""
        self.setup_parts(context)
        for part in self.parts:
            part.taps(context.network)  # a term the teacher cannot serve (BatchNorm statistics) fails here
        rng = ChunkRandomness.for_setup(context.seed)
        with torch.random.fork_rng(devices=[]):
            # the CPU stream only: torch.manual_seed would also reseed every CUDA generator, outside fork_rng's
            # restore (devices=[]), so a GPU fit's own CUDA stream would restart from data.seed
            torch.default_generator.manual_seed(int(torch.randint(0, 2**62, (1,), generator=rng.torch)))
            generator = ImageGenerator(context.input_spec.shape, self.noise_dim, self.width,
                                       context.num_classes if self.conditional else None, context.input_range)
        self.generator = generator.to(context.device)
        height, width = context.input_spec.shape[-2:]
        if self.augment_shift >= min(height, width):
            raise InvalidArgument(f"augment_shift must be smaller than the input ({height} x {width} pixels), "
                                  f"got {self.augment_shift}")
        self.optimizer = self._new_optimizer()
        meta_learned = self.reptile_lr is not None or self.meta_rule is not None
        self.meta_state = copy.deepcopy(self.generator.state_dict()) if meta_learned else None
        self.meta_adam = self._new_meta_adam()
        self.loss_scale = LossScale.for_autocast(context.autocast_for(self.precision), context.device)

    def _new_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.generator.parameters(), lr=self.lr, betas=ADAM_BETAS)

    def _meta_parameter_names(self) -> list[str]:
        return [name for name, p in self.generator.named_parameters() if p.requires_grad]

    def _new_meta_adam(self) -> torch.optim.Optimizer | None:
        """FastDFKD's meta optimizer over the meta weights' parameters (``None`` without ``meta_optimizer``)."""
        if self.meta_rule is None:
            return None
        return torch.optim.Adam([self.meta_state[name] for name in self._meta_parameter_names()],
                                lr=self.lr * self.steps_per_round, betas=ADAM_BETAS)

    def _ready(self) -> ImageGenerator:
        if self.generator is None:
            raise InvalidArgument("call GeneratorSynthesizer.setup(context) before its first round")
        return self.generator

    def round(self, context: SynthesisContext, chunk: Chunk, average: CrossProcessMean | None = None
              ) -> SynthesisResult:
        """One round: train the generator ``steps_per_round`` steps on the chunk's classes and noise; return the
        inputs of its last step (or of its lowest-loss step: ``keep``) ``[N, C, H, W]`` (CPU float32), targets,
        labels and per-sample objective ``[N]``.

        ``average`` (several processes) averages the generator's gradients before each step and its BatchNorm
        running statistics after the round, so every process holds the same generator. The student, when a part
        reads it, is put in eval mode for the round.
        """
        generator = self._ready()
        if self.meta_state is not None:
            generator.load_state_dict(self.meta_state)
            self.optimizer = self._new_optimizer()
        generator.train()
        params = [p for p in generator.parameters() if p.requires_grad]
        autocast = context.autocast_for(self.precision)
        loss_scale = self.loss_scale  # float16 only: gradients kept from underflow
        # the chunk's targets and noise too: made under a caller's inference_mode, autograd could not save them
        with torch.inference_mode(False), torch.enable_grad(), \
                self._chunk_pass(context, chunk) as (student, targets, labels, noise, taps):
            device_targets, device_labels = targets.to(noise.device), labels.to(noise.device)
            # drawn after the noise, and only when there are moves: rounds without them draw what they always did
            moves_seed = (int(torch.randint(0, 2**62, (1,), generator=chunk.rng.torch))
                          if self.augment_shift or self.augment_flip else None)
            learned = [] if self.noise_lr is None else [noise.requires_grad_()]
            noise_optimizer = (torch.optim.Adam(learned, lr=self.noise_lr, betas=ADAM_BETAS) if learned
                               else None)
            summed = [torch.zeros_like(p) for p in params] if self.meta_rule == "fomaml" else []
            lowest = float("inf")
            for step in range(self.steps_per_round):
                moves = None if moves_seed is None else stream_seed(moves_seed, step)
                # a retried step (float16 overflow) starts from the BatchNorm statistics it first saw
                running = [b.clone() for b in generator.buffers()] if loss_scale.enabled else []

                def restore_running() -> None:
                    for buffer, saved in zip(generator.buffers(), running):
                        buffer.copy_(saved)

                def gradients(scale: float) -> tuple[list[Tensor], tuple]:
                    inputs, response = self._generate(autocast, context, noise, device_labels, taps, student,
                                                      moves)
                    per_sample = self.objective(response, device_targets)
                    weights = self.weights_for(response)
                    loss = self.summed_loss(per_sample, weights, inputs, response) / len(inputs)  # batch mean
                    grads = list(torch.autograd.grad(loss * scale if scale != 1.0 else loss, params + learned))
                    taps.clear()
                    if average is not None:  # before the finiteness check: every rank retries alike
                        shared = grads[: len(params)]  # the generator's; each rank's noise is its own, but
                        if learned:  # a non-finite noise gradient on one rank is a retry on every rank
                            shared.append(torch.isfinite(grads[-1]).all().float().reshape(1))
                        average(shared)
                        if learned and float(shared[-1]) < 1.0:
                            grads[-1] = torch.full_like(grads[-1], float("inf"))
                    return grads, (inputs, response, per_sample, weights, loss.detach())

                grads, (*made, loss) = loss_scale.backward(gradients, restore_running)
                if self.keep == "last":
                    inputs, response, per_sample, weights = made
                elif step == 0 or float(loss) < lowest:  # float(): a sync on a GPU, for "lowest_loss" only
                    (inputs, response, per_sample, weights), lowest = made, float(loss)
                for param, grad in zip(params + learned, grads):
                    param.grad = grad
                for total, grad in zip(summed, grads):  # FOMAML's meta gradient (the generator's come first)
                    total.add_(grad)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if noise_optimizer is not None:
                    noise_optimizer.step()
                    noise_optimizer.zero_grad(set_to_none=True)
            if moves_seed is not None:  # the kept (unmoved) inputs' own labels, losses and weights
                with torch.no_grad():
                    response = self._respond(autocast, context, inputs.detach(), taps, student)
                    per_sample = self.objective(response, device_targets)
                    weights = self.weights_for(response)
                    taps.clear()
        if average is not None:  # the saved statistics (BatchNorm's); the output range is the same on every rank
            saved = generator.state_dict(keep_vars=True)
            average([b for name, b in generator.named_buffers() if name in saved and b.is_floating_point()])
        for term in self.regularizers:  # terms that remember rounds (BatchNorm statistics with momentum)
            term.end_round(average)
        if self.meta_adam is not None:
            self._meta_adam_step(summed)
        elif self.meta_state is not None:
            self._reptile_step()
        return self._result(inputs, targets, labels, response, per_sample, weights,
                            self.steps_per_round * len(chunk.indices))

    @torch.no_grad()
    def draw(self, context: SynthesisContext, chunk: Chunk) -> SynthesisResult:
        """The generator's inputs for the chunk's classes and noise, without training it: one forward pass
        (batch statistics, as in a round; its BatchNorm running statistics are left as they were), with the
        teacher's (and student's) response for labels, per-sample objective and weights. ``steps`` is 0.

        Online drivers take extra batches from a round's generator this way: more inputs per round for a
        fraction of a training step's cost (no backward pass)."""
        generator = self._ready()
        running = [b.clone() for b in generator.buffers()]
        generator.train()
        try:
            with self._chunk_pass(context, chunk) as (student, targets, labels, noise, taps):
                inputs, response = self._generate(context.autocast_for(self.precision), context, noise,
                                                  labels.to(noise.device), taps, student)
                per_sample = self.objective(response, targets.to(noise.device))
                weights = self.weights_for(response)
                taps.clear()
        finally:
            for buffer, saved in zip(generator.buffers(), running):
                buffer.copy_(saved)
        return self._result(inputs, targets, labels, response, per_sample, weights, 0)

    @contextlib.contextmanager
    def _chunk_pass(self, context: SynthesisContext, chunk: Chunk
                    ) -> Iterator[tuple[nn.Module | None, Tensor, Tensor, Tensor, FeatureTaps]]:
        """``(student, targets, labels, noise, taps)`` for a pass over the chunk: the student when a part reads
        it (in eval mode until the block ends), the chunk's targets and labels (CPU), its noise ``[N, noise_dim]``
        on the context's device (drawn after the targets), and taps on every activation the parts read."""
        student = self.student_for(context)
        with evaluating(student):
            targets, labels = self.target_sampler.sample(chunk, context)
            noise = torch.randn(len(chunk.indices), self.noise_dim, generator=chunk.rng.torch)
            with self.feature_taps(context) as taps:
                yield student, targets, labels, noise.to(torch.device(context.device)), taps

    def _generate(self, autocast: Autocast, context: SynthesisContext, noise: Tensor, labels: Tensor,
                  taps: FeatureTaps, student: nn.Module | None, moves: int | None = None) -> tuple[Tensor, Response]:
        """The generator's inputs ``[N, C, H, W]`` for ``noise`` (and ``labels`` when conditional) and the networks'
        response to them, under ``autocast``; inputs and logits float32. ``moves``: the seed of the shifts and
        flips the networks see the inputs through (``None``: they see them as they are)."""
        with autocast():
            inputs = self.generator(noise, labels if self.conditional else None).float()
        if moves is None:
            return inputs, self._respond(autocast, context, inputs, taps, student)
        pixels = shift_and_flip(to_pixels(inputs, context.input_range), self.augment_shift, self.augment_flip,
                                torch.Generator().manual_seed(moves))  # float32, outside autocast
        return inputs, self._respond(autocast, context, from_pixels(pixels, context.input_range), taps, student)

    @staticmethod
    def _respond(autocast: Autocast, context: SynthesisContext, inputs: Tensor, taps: FeatureTaps,
                 student: nn.Module | None) -> Response:
        """The teacher's (and, when a part reads it, the student's) response to ``inputs``, under ``autocast``;
        logits float32."""
        with autocast():
            logits = context.teacher(inputs)
            # the student gets the layout it trains on (a .view() of its features would fail on channels-last)
            student_logits = None if student is None else student(default_layout(inputs))
        return Response(logits.float(), taps.features, None if student_logits is None else student_logits.float())

    def _result(self, inputs: Tensor, targets: Tensor, labels: Tensor, response: Response, per_sample: Tensor,
                weights: Tensor | None, steps: int) -> SynthesisResult:
        predicted = response.logits.detach().argmax(dim=-1).cpu()
        return SynthesisResult(inputs=inputs.detach().float().cpu().contiguous(), targets=targets.float(),
                               labels=(predicted if self.labels_from_teacher else labels).long(),
                               loss=per_sample.detach().float().cpu(), steps=steps,
                               weights=None if weights is None else weights.detach().float().cpu(),
                               predicted=predicted)

    @torch.no_grad()
    def _reptile_step(self) -> None:
        """``meta += reptile_lr * (fast - meta)`` for floating-point entries (BatchNorm's step counts follow)."""
        fast = self.generator.state_dict()
        for name, meta in self.meta_state.items():
            if meta.is_floating_point():
                meta.add_(fast[name].detach() - meta, alpha=self.reptile_lr)
            else:
                meta.copy_(fast[name])

    @torch.no_grad()
    @torch.inference_mode(False)  # Adam's state, made here, must not be inference tensors (a caller's mode)
    def _meta_adam_step(self, summed: list[Tensor]) -> None:
        """One Adam step of the meta weights' parameters on ``meta - fast`` (Reptile) or on ``summed``, the round's
        generator gradients (FOMAML); their other entries (BatchNorm's statistics) take the round's values."""
        fast = self.generator.state_dict()
        names = self._meta_parameter_names()
        for index, name in enumerate(names):
            meta = self.meta_state[name]
            meta.grad = meta - fast[name].detach() if self.meta_rule == "reptile" else summed[index]
        self.meta_adam.step()
        self.meta_adam.zero_grad(set_to_none=True)
        for name, meta in self.meta_state.items():
            if name not in names:
                meta.copy_(fast[name])

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The generator's weights, its optimizer's state, the meta weights (Reptile) and their optimizer's state
        (``meta_optimizer``), the loss scale (float16) and the regularizers' memories of earlier rounds, for
        checkpoints."""
        generator = self._ready()
        return {"generator": generator.state_dict(), "optimizer": self.optimizer.state_dict(),
                "meta": self.meta_state, "loss_scale": self.loss_scale.state_dict(),
                "meta_optimizer": None if self.meta_adam is None else self.meta_adam.state_dict(),
                "regularizers": [{"name": term.stable_name, "state": term.state_dict()}
                                 for term in self.regularizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (after :meth:`setup`, on the setup device)."""
        generator = self._ready()
        generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("loss_scale") is not None:
            self.loss_scale.load_state_dict(state["loss_scale"])
        saved = state.get("regularizers") or []  # [] from a checkpoint of before the memories
        names = [term.stable_name for term in self.regularizers]
        if [t.get("name") for t in saved] != names:
            remembering = [str(t.get("name", "a term saved without its name"))  # bare states: eaba0a9's format
                           for t in saved if (t.get("state") if "name" in t else t)]
            if remembering:
                raise ZSKDError(f"the checkpoint's generator remembers earlier rounds in {', '.join(remembering)} "
                                f"(its terms: {[t.get('name') for t in saved]}), this one's terms are {names}: resume "
                                f"with the settings it was saved with")
            saved = [{"name": name, "state": {}} for name in names]
        for term, entry in zip(self.regularizers, saved):
            term.load_state_dict(entry["state"])
        if state.get("meta") is not None:
            device = next(generator.parameters()).device
            self.meta_state = {k: v.to(device).clone() for k, v in state["meta"].items()}  # not the caller's
            self.meta_adam = self._new_meta_adam()  # over the restored tensors
            if self.meta_adam is not None and state.get("meta_optimizer") is not None:
                self.meta_adam.load_state_dict(state["meta_optimizer"])
