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
        iterations: Adam steps per chunk.
        lr: Adam learning rate on the inputs.
        init: ``"uniform"`` noise over the valid input range, or ``"normal"`` (standard normal, then clamped).

    The loss that is minimized is the SUM over the chunk of the per-sample losses, so each impression's
    gradient does not depend on how many others share its chunk. After every step the inputs are clamped to
    the valid range (the teacher's normalization of pixel values in [0, 1]), when one is known.
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
    ) -> None:
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        self.target_sampler = target_sampler
        self.objective = objective
        self.regularizers = list(regularizers)
        self.iterations = iterations
        self.lr = lr
        self.init = init

    def settings(self) -> dict[str, Any]:
        """Every setting that changes the impressions (the cache refuses to mix different settings)."""
        return {
            "name": self.name,
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "target_sampler": self.target_sampler.settings(),
            "objective": self.objective.settings(),
            "regularizers": [r.settings() for r in self.regularizers],
            "iterations": self.iterations,
            "lr": self.lr,
            "init": self.init,
        }

    def setup(self, teacher: nn.Module) -> None:
        """Once per run, before any chunk: let the target sampler read the teacher."""
        self.target_sampler.setup(teacher)

    def initial_inputs(self, n: int, input_shape: Sequence[int], input_range: tuple[Tensor, Tensor] | None,
                       generator: torch.Generator) -> Tensor:
        """Noise ``[n, *input_shape]`` (float32, CPU) drawn from ``generator``."""
        shape = (n, *input_shape)
        if self.init == "normal" or input_range is None:
            x = torch.randn(shape, generator=generator)
            return x if input_range is None else torch.maximum(torch.minimum(x, input_range[1]), input_range[0])
        low, high = input_range
        return low + (high - low) * torch.rand(shape, generator=generator)

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
        final mean loss)``. Input gradients are enabled here even inside ``torch.inference_mode()`` or
        ``torch.no_grad()`` blocks (Lightning's predict/validation contexts).
        """
        device = torch.device(device)
        targets, labels = self.target_sampler.sample(indices, num_classes, rng)
        x0 = self.initial_inputs(len(indices), input_shape, input_range, rng.torch)
        bounds = None if input_range is None else tuple(b.to(device) for b in input_range)
        with torch.inference_mode(False), torch.enable_grad():
            inputs = x0.to(device).requires_grad_(True)
            device_targets = targets.to(device)
            optimizer = torch.optim.Adam([inputs], lr=self.lr)
            hooked = [self.objective, *self.regularizers]
            for part in hooked:
                part.attach(teacher)
            try:
                loss_value = math.nan
                for iteration in range(1, self.iterations + 1):
                    optimizer.zero_grad(set_to_none=True)
                    with autocast():
                        logits = teacher(inputs)
                    per_sample = self.objective(logits.float(), device_targets)
                    loss = per_sample.sum()
                    for reg in self.regularizers:
                        penalty = reg(inputs)
                        loss = loss + reg.weight * (penalty.sum() if penalty.ndim else penalty * len(inputs))
                    loss.backward()
                    optimizer.step()
                    if bounds is not None:
                        with torch.no_grad():
                            inputs.clamp_(min=bounds[0], max=bounds[1])
                    if progress is not None and (iteration % 25 == 0 or iteration == self.iterations):
                        loss_value = float(per_sample.detach().mean())
                        progress(iteration, loss_value)
                if progress is None:
                    loss_value = float(per_sample.detach().mean())
            finally:
                for part in hooked:
                    part.detach()
        return inputs.detach().float().cpu(), targets.float(), labels.long(), loss_value
