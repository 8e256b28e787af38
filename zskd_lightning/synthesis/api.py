"""The synthesis API: what a method is given (a context), what it returns (a result), and its parts.

A synthesis method answers *what* each impression should make the teacher do (a :class:`TargetSampler`, a
per-sample :class:`Objective`, input :class:`Regularizer` priors, optionally per-sample weights) and *how*
inputs are found (the inversion engine, :mod:`zskd_lightning.synthesis.inversion`). It knows nothing of
Lightning, ranks or files: drivers (:mod:`zskd_lightning.impressions`) call it chunk by chunk.

Work comes in chunks of global impression indices. Everything random about a chunk is drawn from a
:class:`ChunkRandomness` made from ``(seed, chunk)`` alone, and everything a part precomputes in ``setup`` from
``(seed, "setup")`` alone, so the result is identical whichever rank made which chunk (on one kind of device
and its kernels: a CPU and a GPU round differently in the last bits).

Shapes: ``indices [N]``; ``targets [N, ...]`` (soft labels ``[N, num_classes]`` for the label-matching
methods); ``labels [N]`` int64, the class an impression was made for (stored apart from the targets);
``inputs [N, C, H, W]`` in the teacher's input space (after its normalization).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from zskd_lightning.describe import Recorded, describe
from zskd_lightning.errors import InvalidArgument
from zskd_lightning.pixels import InputRange, InputSpec
from zskd_lightning.taps import FeatureTaps, Tap
from zskd_lightning.weighting import SampleWeighting

Autocast = Callable[[], contextlib.AbstractContextManager]
ProgressFn = Callable[[int, float], None]
"""Called as ``progress(iteration, mean_loss)`` every few iterations (for progress reports)."""


def _torch_generator(sequence: np.random.SeedSequence) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(sequence.generate_state(1, np.uint64)[0] & 0x7FFF_FFFF_FFFF_FFFF))
    return generator


@dataclass
class ChunkRandomness:
    """Independent random streams for one chunk, derived from ``(seed, chunk_index)`` only.

    ``numpy`` serves the target samplers (Dirichlet/Gaussian draws); ``torch`` the input initialisation.
    """

    numpy: np.random.Generator
    torch: torch.Generator

    @classmethod
    def for_chunk(cls, seed: int, chunk_index: int) -> ChunkRandomness:
        numpy_seq, torch_seq = np.random.SeedSequence([int(seed), int(chunk_index)]).spawn(2)
        return cls(numpy=np.random.default_rng(numpy_seq), torch=_torch_generator(torch_seq))

    @classmethod
    def for_setup(cls, seed: int) -> ChunkRandomness:
        """The streams of a run's ``setup``, apart from every chunk's. Their key ``[seed, 0x5E7]`` is also chunk
        1511's, whose streams are its children 0 and 1: setup takes children 3 (NumPy) and 2 (torch)."""
        children = np.random.SeedSequence([int(seed), 0x5E7]).spawn(4)
        numpy_seq, torch_seq = children[3], children[2]
        return cls(numpy=np.random.default_rng(numpy_seq), torch=_torch_generator(torch_seq))


@dataclass
class Chunk:
    """One unit of work: global impression ``indices [N]`` (int64) and the chunk's random streams."""

    indices: Tensor
    rng: ChunkRandomness

    @classmethod
    def of(cls, seed: int, chunk_index: int, start: int, stop: int) -> Chunk:
        return cls(torch.arange(start, stop), ChunkRandomness.for_chunk(seed, chunk_index))


@dataclass
class SynthesisContext:
    """What a synthesis runs with; the same on every rank except ``device``.

    Args:
        teacher: the frozen teacher (its ``network`` attribute, when it has one, is what taps address).
        input_spec: the teacher's input shape and normalization (the valid range).
        num_classes: the teacher's number of outputs.
        device: where the teacher and the inputs live.
        autocast: the Trainer's precision context for the teacher's forward pass (``nullcontext``: float32).
        student: the student being distilled, for methods whose criteria compare the two (else ``None``).
        seed: the run's seed: ``setup`` streams come from it.
    """

    teacher: nn.Module
    input_spec: InputSpec
    num_classes: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast: Autocast = contextlib.nullcontext
    student: nn.Module | None = None
    seed: int = 0

    @property
    def network(self) -> nn.Module:
        """The module taps address: the teacher's ``network`` if it wraps one, else the teacher."""
        inner = getattr(self.teacher, "network", None)
        return inner if isinstance(inner, nn.Module) else self.teacher

    @property
    def input_range(self) -> InputRange | None:
        return self.input_spec.valid_range()

    def autocast_for(self, precision: str | None) -> Autocast:
        """The autocast a synthesizer's ``precision`` asks for (one of :data:`SYNTHESIS_PRECISIONS`): ``None``,
        this context's (the Trainer's precision plugin's, as for distillation); ``"bf16-mixed"``, bf16 autocast on
        the context's device; ``"32-true"``, float32 (an enclosing autocast turned off)."""
        check_synthesis_precision(precision)
        device_type = torch.device(self.device).type
        if precision == "bf16-mixed":
            return lambda: torch.autocast(device_type, dtype=torch.bfloat16)
        return (lambda: torch.autocast(device_type, enabled=False)) if precision == "32-true" else self.autocast


SYNTHESIS_PRECISIONS = (None, "bf16-mixed", "32-true")
"""A synthesizer's ``precision`` choices (see :meth:`SynthesisContext.autocast_for`)."""


def check_synthesis_precision(precision: str | None) -> None:
    """One-line error unless ``precision`` is one of :data:`SYNTHESIS_PRECISIONS`."""
    if precision not in SYNTHESIS_PRECISIONS:
        raise InvalidArgument(f"precision must be one of {SYNTHESIS_PRECISIONS}, got {precision!r}")


@dataclass
class Response:
    """The teacher's response to a batch: ``logits [N, K]`` (float32), the tapped ``features`` (by
    :attr:`~zskd_lightning.taps.Tap.key`), and the student's logits when a part asked for them."""

    logits: Tensor
    features: dict[str, Tensor] = field(default_factory=dict)
    student_logits: Tensor | None = None


@dataclass
class SynthesisResult:
    """A synthesized chunk, on the CPU: ``inputs [N, *shape]`` float32, ``targets [N, ...]`` float32,
    ``labels [N]`` int64, the per-sample ``loss [N]`` float32 of the last step taken (measured before that
    step's update), ``steps`` (impression-iterations), and where the engine returns them (a generator's rounds
    and draws; ``None`` otherwise, and from per-input inversion) the method's per-sample ``weights [N]`` and the
    teacher's argmax class on each returned input, ``predicted [N]`` int64."""

    inputs: Tensor
    targets: Tensor
    labels: Tensor
    loss: Tensor
    steps: int
    weights: Tensor | None = None
    predicted: Tensor | None = None


class Part(Recorded):
    """A component of a method: declares the activations it reads, and whether it needs the student."""

    needs_student: bool = False

    def taps(self, network: nn.Module) -> Sequence[Tap]:
        """The activations of ``network`` this part reads from a :class:`Response` (default: none)."""
        return ()

    def setup(self, context: SynthesisContext, rng: ChunkRandomness) -> None:
        """Precompute from the context once per run, before any chunk; same result on every rank."""


class TargetSampler(Part, ABC):
    """Draws what each impression should make the teacher output."""

    @abstractmethod
    def sample(self, chunk: Chunk, context: SynthesisContext) -> tuple[Tensor, Tensor]:
        """``(targets [N, ...] float32 CPU, labels [N] int64 CPU)`` for the chunk's indices, from ``chunk.rng``."""


class Objective(Part, ABC):
    """Per-sample loss between the teacher's response and the targets (lower is better)."""

    @abstractmethod
    def __call__(self, response: Response, targets: Tensor) -> Tensor:
        """``response``, ``targets [N, ...]`` -> loss ``[N]``."""


class Regularizer(Part, ABC):
    """A prior on the inputs, added to the objective with weight ``weight``. Regularizers compose (a list)."""

    weight: float = 1.0
    #: True for a statistic of the whole batch (a scalar penalty): its value depends on which inputs are in it.
    batch_level: bool = False

    @abstractmethod
    def __call__(self, inputs: Tensor, response: Response) -> Tensor:
        """``inputs [N, C, H, W]`` -> penalty ``[N]`` (per sample) or a scalar (a batch statistic)."""

    @property
    def across_rounds(self) -> bool:
        """Whether the term carries state from one generator round to the next (:meth:`end_round`): only the
        online engine runs rounds; the impression engine refuses such a term (its chunks are independent)."""
        return False

    def end_round(self, average: Callable[[list[Tensor]], None] | None) -> None:
        """After each generator round (every process; ``average`` makes tensors the processes' mean in place,
        ``None`` with one process)."""

    def state_dict(self) -> dict[str, Any]:
        """What :meth:`end_round` carries (for checkpoints); ``{}`` for a term without state."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (after setup)."""


class Method(Recorded):
    """What every synthesis engine shares: its parts (a target sampler, an objective, regularizers), set up once per
    run from ``(seed, "setup")``, and an identity derived from its constructor arguments."""

    target_sampler: TargetSampler
    objective: Objective
    regularizers: list[Regularizer]
    sample_weights: SampleWeighting | None

    @property
    def parts(self) -> list[Part]:
        return [self.target_sampler, self.objective, *self.regularizers]

    def feature_taps(self, context: SynthesisContext) -> FeatureTaps:
        """Taps on the context's network for every activation the method's parts read (a context manager)."""
        return FeatureTaps(context.network, [tap for part in self.parts for tap in part.taps(context.network)])

    @property
    def reads_student(self) -> bool:
        """Whether a part or the sample weighting reads the student's logits."""
        parts = [*self.parts, *([self.sample_weights] if self.sample_weights is not None else [])]
        return any(getattr(p, "needs_student", False) for p in parts)

    def student_for(self, context: SynthesisContext) -> nn.Module | None:
        """The context's student when a part or the sample weighting reads it, else ``None`` (no student pass)."""
        return context.student if self.reads_student else None

    def weights_for(self, response: Response) -> Tensor | None:
        """Per-sample weights ``[N]`` of the objective for this response (``None`` without a weighting)."""
        return None if self.sample_weights is None else self.sample_weights(response.logits, response.student_logits)

    def summed_loss(self, per_sample: Tensor, weights: Tensor | None, inputs: Tensor, response: Response) -> Tensor:
        """The method's loss over a batch of ``N`` inputs, as a SUM over samples: ``sum_i w_i l_i`` plus, per
        regularizer, ``weight`` times its per-sample penalties summed (or ``N`` times a batch-level penalty), so
        every term counts once per sample."""
        loss = per_sample.sum() if weights is None else (weights * per_sample).sum()
        for reg in self.regularizers:
            penalty = reg(inputs, response)
            loss = loss + reg.weight * (penalty.sum() if penalty.ndim else penalty * len(inputs))
        return loss

    def identity(self) -> dict:
        """The method's stable name and every constructor argument (a cache refuses to mix identities)."""
        return describe(self)

    def setup_parts(self, context: SynthesisContext) -> None:
        """Each part reads the context once (e.g. the teacher's class similarity), drawing any randomness from
        ``(context.seed, "setup")`` so every rank computes the same."""
        rng = ChunkRandomness.for_setup(context.seed)
        with torch.inference_mode(False):  # what parts make here (a basis, a covariance) is used with gradients
            for part in self.parts:
                part.setup(context, rng)
