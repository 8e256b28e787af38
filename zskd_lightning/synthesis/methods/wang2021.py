"""Soft targets from a Gaussian over the teacher's features (Zi Wang, "Data-Free Knowledge Distillation with
Soft Targeted Transfer Set Synthesis", AAAI 2021, arXiv 2104.04868).

ZSKD draws its targets per class from a Dirichlet; for 20-40% of them the teacher's own argmax disagrees.
Wang instead models an intermediate feature layer (default: the input of the classifier, LeNet-5's 84-unit FC-2
output) as ``N(0, sigma * R)``, with ``R`` a correlation matrix made from the teacher's weights, samples feature
vectors jointly (not per class), and runs the rest of the teacher on them: ``softmax(head(f) / T)`` are the soft
targets. Inputs are then synthesized from noise to match them, plus an activation term that rewards strong
features (DAFL's ``-mean |f|``).

How the paper builds ``R`` is not public; both readings are here (``correlation``):

- ``"outgoing"``: cosine similarity of the feature units' OUTGOING weight vectors (the columns of the weight of
  the layer that consumes the features, ``[K, d]``); rank at most ``K``, so ``eps * I`` is added.
- ``"incoming"``: cosine similarity of the units' INCOMING weight vectors (the rows of the weight of the layer
  that produces the features, ``[d, fan_in]``); full rank when ``fan_in > d``.

The default is the one chosen on the MNIST validation split (README, "Wang 2021").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zskd_lightning.errors import InvalidArgument, ZSKDError
from zskd_lightning.synthesis.api import Chunk, ChunkRandomness, Regularizer, Response, SynthesisContext, TargetSampler
from zskd_lightning.synthesis.inversion import Synthesizer
from zskd_lightning.synthesis.objectives import SoftTargetCrossEntropy
from zskd_lightning.synthesis.targets import balanced_classes, interleaved_groups
from zskd_lightning.taps import Tap, run_from, submodule

Correlation = Literal["outgoing", "incoming"]


def check_where(layer: str | None, where: str) -> None:
    """One line unless ``where`` is ``"input"`` or ``"output"`` and, without a ``layer``, ``"input"``."""
    if where not in ("input", "output"):
        raise InvalidArgument(f"where must be 'input' or 'output', got {where!r}")
    if layer is None and where != "input":
        raise InvalidArgument(f"where={where!r} needs a `layer`: without one, Wang 2021 models the input of the "
                              "last nn.Linear")


def feature_layer(network: nn.Module, layer: str | None, where: str,
                  user: str = "Wang 2021") -> tuple[Tap, int, nn.Linear | None, nn.Linear | None]:
    """The modelled features of ``network``: ``(tap, width d, consuming nn.Linear, producing nn.Linear)``.

    ``layer`` names an ``nn.Linear``; ``where="input"`` models its input (it consumes the features; the producer
    is the last earlier ``nn.Linear`` with ``d`` outputs), ``"output"`` its output (it produces them; the consumer
    is the first later ``nn.Linear`` with ``d`` inputs). ``None``: the input of the last ``nn.Linear``. ``user``
    names what reads the features in the errors (a method or a term).
    """
    linears = [(name, m) for name, m in network.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ZSKDError(f"{type(network).__name__} has no nn.Linear layer whose features {user} could read")
    check_where(layer, where)
    if layer is None:
        layer = linears[-1][0]
    module = submodule(network, layer)
    if not isinstance(module, nn.Linear):
        raise ZSKDError(f"{user} reads the features at an nn.Linear; {layer!r} is a {type(module).__name__}")
    position = [name for name, _ in linears].index(layer)
    if where == "input":
        width, consumer = module.in_features, module
        earlier = [m for _, m in linears[:position] if m.out_features == width]
        producer = earlier[-1] if earlier else None
    else:
        width, producer = module.out_features, module
        later = [m for _, m in linears[position + 1:] if m.in_features == width]
        consumer = later[0] if later else None
    return Tap(layer, where), width, consumer, producer


def weight_correlation(consumer: nn.Linear | None, producer: nn.Linear | None, reading: Correlation) -> Tensor:
    """``R [d, d]`` float64: cosine similarity of the units' outgoing (consumer columns) or incoming (producer
    rows) weight vectors; unit diagonal, except 0 for a unit whose weight vector is all zeros (a dead unit of a
    weight-decayed teacher, its subnormal weights flushed); the sampler's ``eps * I`` (eps > 0) keeps the
    covariance positive definite."""
    if reading == "outgoing":
        if consumer is None:
            raise ZSKDError("correlation 'outgoing' needs a later nn.Linear that consumes the modelled features")
        vectors = consumer.weight.detach().double().cpu().T  # [d, K]
    else:
        if producer is None:
            raise ZSKDError("correlation 'incoming' needs an earlier nn.Linear that produces the modelled features")
        vectors = producer.weight.detach().double().cpu()  # [d, fan_in]
    unit = F.normalize(vectors, dim=1)
    return unit @ unit.T


class GaussianFeatureTargets(TargetSampler):
    """Wang 2021's targets: ``f ~ N(0, sigma * R + eps * I)`` at the modelled layer, target
    ``softmax(head(f) / T)`` and label its argmax (the teacher's own class for the feature vector).

    Features are drawn as ``L z`` (``L`` the Cholesky factor, ``z`` standard normal from the chunk's numpy
    stream), jointly over the whole transfer set, and with ``rectify`` passed through a ReLU (whether the paper
    does is not known; the features a ReLU network's classifier reads are non-negative). The head is the teacher
    run from the modelled layer on (:func:`~zskd_lightning.taps.run_from`), so any ``nn.Module`` works whose later
    layers read earlier ones only through that layer.

    Two options beyond the paper, neither of which helped LeNet-5 on MNIST (README, "Wang 2021"): ``sigma`` may be
    a list, impression ``i`` then drawing from ``sigma[(i // K) % len(sigma)]`` (as ZSKD spreads its betas), a
    mixture of confidences; with ``balanced`` the Gaussian is conditioned on the teacher's class, as ZSKD allots
    its classes: impression ``i`` keeps the first draw whose argmax is class ``i mod K`` (rejection, rounds of
    ``4 N`` draws from the chunk's stream for the ``N`` impressions of one sigma, so identical on every rank).
    Unconditioned, the classes follow the teacher's head: 5-13% each for LeNet-5 on MNIST at sigma 5, 5.5-15% for
    the CIFAR-10 AlexNet at sigma 2 (2,560 draws, seed 0).
    """

    #: rounds of ``4 N`` draws a balanced chunk may take before a class is declared out of the head's reach
    max_rounds = 64

    def __init__(self, sigma: float | Sequence[float] = 1.5, correlation: Correlation = "outgoing",
                 layer: str | None = None, where: Literal["input", "output"] = "input", eps: float = 1e-4,
                 temperature: float = 20.0, rectify: bool = False, balanced: bool = False) -> None:
        sigmas = tuple(float(value) for value in (sigma if isinstance(sigma, Sequence) else [sigma]))
        if not sigmas or min(sigmas) <= 0 or eps < 0 or temperature <= 0:
            raise InvalidArgument(f"sigma and temperature must be > 0 and eps >= 0, got {sigma}, {temperature}, {eps}")
        if correlation not in ("outgoing", "incoming"):
            raise InvalidArgument(f"correlation must be 'outgoing' or 'incoming', got {correlation!r}")
        check_where(layer, where)
        self.sigmas, self.correlation, self.layer, self.where = sigmas, correlation, layer, where
        self.eps, self.temperature, self.rectify = float(eps), float(temperature), bool(rectify)
        self.balanced = bool(balanced)
        self.tap: Tap | None = None
        self.factors: list[Tensor] = []  # Cholesky factors of sigma * R + eps * I, one per sigma

    def setup(self, context: SynthesisContext, rng: ChunkRandomness) -> None:
        tap, width, consumer, producer = feature_layer(context.network, self.layer, self.where)
        self.tap = tap
        correlation = weight_correlation(consumer, producer, self.correlation)
        self.factors = []
        for sigma in self.sigmas:
            jittered = sigma * correlation + self.eps * torch.eye(width, dtype=torch.float64)
            factor, info = torch.linalg.cholesky_ex(jittered)
            if int(info):
                raise InvalidArgument(f"sigma * R + eps * I is not positive definite at {tap.key!r} for sigma {sigma}; "
                                      f"raise eps (now {self.eps})")
            self.factors.append(factor)

    def sample_features(self, n: int, rng: np.random.Generator, group: int = 0) -> Tensor:
        """``n`` feature vectors ``[n, d]`` float32 from the Gaussian of ``sigma[group]``, drawn from ``rng``."""
        if not self.factors:
            raise RuntimeError("GaussianFeatureTargets.setup(context, rng) must run before sampling")
        factor = self.factors[group]
        z = rng.standard_normal((n, factor.shape[0]))
        return (torch.from_numpy(z) @ factor.T).float()

    def head_logits(self, n: int, rng: np.random.Generator, context: SynthesisContext, group: int = 0) -> Tensor:
        """The teacher's logits ``[n, K]`` float32 (CPU) on ``n`` fresh feature draws of ``sigma[group]``."""
        features = self.sample_features(n, rng, group)
        if self.rectify:  # the modelled layer's real features are post-ReLU (non-negative), e.g. LeNet-5's FC-2
            features = features.clamp_min(0)
        with torch.no_grad():
            logits = run_from(context.network, self.tap, features.to(context.device), context.input_spec.shape)
        return logits.float().cpu()

    def balanced_logits(self, classes: Tensor, rng: np.random.Generator, context: SynthesisContext,
                        group: int = 0) -> Tensor:
        """Logits ``[N, K]`` of draws whose argmax is ``classes [N]``: the first such draw per slot, in order."""
        logits = torch.empty(len(classes), context.num_classes)
        open_slots = torch.ones(len(classes), dtype=torch.bool)
        for _ in range(self.max_rounds):
            drawn = self.head_logits(4 * len(classes), rng, context, group)
            drawn_classes = drawn.argmax(dim=-1)
            for k in classes[open_slots].unique().tolist():
                slots = (open_slots & (classes == k)).nonzero().squeeze(1)
                hits = (drawn_classes == k).nonzero().squeeze(1)[: len(slots)]
                logits[slots[: len(hits)]] = drawn[hits]
                open_slots[slots[: len(hits)]] = False
            if not open_slots.any():
                return logits
        missing = sorted(set(classes[open_slots].tolist()))
        # max_rounds x 4N draws fill about N / K slots of a class: it was drawn under once in 4 max_rounds K draws
        raise ZSKDError(f"balanced Wang targets: classes {missing} are the teacher's argmax for under about 1 in "
                        f"{4 * self.max_rounds * context.num_classes} draws at {self.tap.key!r}; use balanced=False "
                        "or a larger sigma")

    def sample(self, chunk: Chunk, context: SynthesisContext) -> tuple[Tensor, Tensor]:
        num_classes = context.num_classes
        groups = interleaved_groups(chunk.indices, num_classes, len(self.sigmas))
        logits = torch.empty(len(chunk.indices), num_classes)
        for group in range(len(self.sigmas)):
            members = (groups == group).nonzero().squeeze(1)
            if not len(members):
                continue
            if self.balanced:
                classes = balanced_classes(chunk.indices[members], num_classes)
                logits[members] = self.balanced_logits(classes, chunk.rng.numpy, context, group)
            else:
                logits[members] = self.head_logits(len(members), chunk.rng.numpy, context, group)
        targets = torch.softmax(logits / self.temperature, dim=-1)
        return targets, targets.argmax(dim=-1)


class FeatureActivation(Regularizer):
    """DAFL's activation term (Chen et al., ICCV 2019) as Wang 2021 uses it: ``-mean_j |f_j|`` per sample at the
    modelled layer (default: the classifier's input), ``[N]``: rewards inputs that excite the features strongly."""

    def __init__(self, weight: float = 0.05, layer: str | None = None, where: Literal["input", "output"] = "input") -> None:
        check_where(layer, where)
        self.weight, self.layer, self.where = float(weight), layer, where
        self._tap: Tap | None = None

    def taps(self, network: nn.Module) -> Sequence[Tap]:
        self._tap = feature_layer(network, self.layer, self.where,
                                  user="the activation term (FeatureActivation; a weight of 0 leaves it out)")[0]
        return [self._tap]

    def __call__(self, inputs: Tensor, response: Response) -> Tensor:
        return -response.features[self._tap.key].float().abs().flatten(1).mean(1)


class ScaledSoftTargetCrossEntropy(SoftTargetCrossEntropy):
    """``scale * CE(y, softmax(logits / T))`` per sample, ``[N]``; ``scale = T**2`` is Hinton's convention, which
    keeps the matching gradient's size independent of ``T`` against the activation term's."""

    def __init__(self, temperature: float = 20.0, scale: float = 1.0) -> None:
        super().__init__(temperature)
        if scale <= 0:
            raise InvalidArgument(f"matching_scale must be > 0, got {scale}")
        self.scale = float(scale)

    def __call__(self, response: Response, targets: Tensor) -> Tensor:
        return self.scale * super().__call__(response, targets)


class WangSynthesizer(Synthesizer):
    """Wang 2021 (AAAI): Gaussian feature targets, matched at temperature T, plus the activation term.

    Paper settings: sigma 1.5 (MNIST) or 2.0 (CIFAR-10); ``activation_weight`` (lambda_a) 0.05 for LeNet-5, 0.1
    for AlexNet; T = 20. ``regularizers`` given in ``synthesizer_settings`` are added after the activation term.

    Args:
        sigma, correlation, layer, where, eps, rectify, balanced: of :class:`GaussianFeatureTargets`.
        temperature: T of the target softmax and of the matching loss.
        matching_scale: factor of the matching loss, ``"t_squared"`` (``T**2``, the default, chosen on the MNIST
            validation split: students 80.28% against 65.42% unscaled) or a number. Synthesis uses Adam, so only
            its ratio to ``activation_weight`` and the priors' weights matters.
        activation_weight: lambda_a of :class:`FeatureActivation` (0 leaves the term out).
        synthesizer_settings: the loop's settings (``iterations``, ``lr``, ``init``, ``regularizers``, ...) of
            :class:`~zskd_lightning.synthesis.inversion.Synthesizer`.
    """

    identity_name = "wang2021"

    def __init__(
        self,
        sigma: float | Sequence[float] = 1.5,
        correlation: Correlation = "outgoing",
        layer: str | None = None,
        where: Literal["input", "output"] = "input",
        eps: float = 1e-4,
        temperature: float = 20.0,
        activation_weight: float = 0.05,
        rectify: bool = False,
        balanced: bool = False,
        matching_scale: float | Literal["t_squared"] = "t_squared",
        **synthesizer_settings: Any,
    ) -> None:
        if matching_scale == "t_squared":
            matching_scale = float(temperature) ** 2
        elif isinstance(matching_scale, str):
            raise InvalidArgument(f"matching_scale must be a number or 't_squared', got {matching_scale!r}")
        extra = list(synthesizer_settings.pop("regularizers", ()))
        activation = [FeatureActivation(activation_weight, layer, where)] if activation_weight else []
        super().__init__(
            target_sampler=GaussianFeatureTargets(sigma, correlation, layer, where, eps, temperature, rectify,
                                                  balanced),
            objective=ScaledSoftTargetCrossEntropy(temperature, matching_scale),
            regularizers=activation + extra,
            **synthesizer_settings,
        )
