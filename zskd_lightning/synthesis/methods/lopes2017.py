"""Data-free distillation from activation metadata (Lopes, Fenu and Starner, "Data-Free Knowledge Distillation
for Deep Neural Networks", 2017, arXiv 1710.07535).

The teacher's owner records per-class statistics of chosen layers on the real training set
(:mod:`zskd_lightning.metadata`). Each impression of class ``c`` gets targets drawn from the class's recorded
Gaussian of every layer it matches, and its input is optimized until the teacher's activations reach them:
``top_layer`` matches the logits divided by the recorded temperature, ``all_layers`` every recorded layer.
Departures from the authors' public code, on purpose: draws are ``mean + L z`` with ``L`` the Cholesky factor of
the covariance (not ``mean + Sigma z``), no ReLU on targets or outputs (negative logits are matched too), and
``all_layers`` sums each layer's mean squared error (the authors weigh each by ``1 / size`` once more, so wide
conv layers count less there; not yet compared on a validation split). The recorder's default layers are every
conv and linear layer, read after an in-place ReLU that follows one (post-activation), and include the last
linear layer, whose raw logits are then matched beside ``logits / T`` (the authors record ``logits / T`` only).

The spectral objectives (the paper's idea; its definitions are not public, so these are our design): the
recorded ``nn.Linear`` layers form a graph, neurons as nodes and the absolute weights between consecutive layers
as edges; an activation record is a signal on that graph, and the objective matches only its lowest-frequency
graph-Fourier coefficients (the eigenvectors of the normalized Laplacian ``I - D^-1/2 A D^-1/2`` with the
smallest eigenvalues, a ``spectral_fraction`` of them). ``spectral_all_layers``: one graph over every recorded linear
layer; ``spectral_layer_pairs``: one graph per pair of consecutive layers (smaller eigendecompositions), their
losses summed. Convolution outputs are left out (a conv layer's graph has ``C * H * W`` nodes). The targets are
the same per-layer draws as ``all_layers`` (layers drawn independently: the record holds no cross-layer
covariance), projected onto the same basis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from zskd_lightning.errors import InvalidArgument, ZSKDError
from zskd_lightning.metadata.file import LOGITS, Metadata, read_metadata
from zskd_lightning.pixels import from_pixels, pixel_noise
from zskd_lightning.synthesis.api import (
    Chunk,
    ChunkRandomness,
    Objective,
    Response,
    SynthesisContext,
    SynthesisResult,
    TargetSampler,
)
from zskd_lightning.synthesis.inversion import Synthesizer
from zskd_lightning.synthesis.targets import balanced_classes
from zskd_lightning.taps import Tap, submodule
from zskd_lightning.teacher import module_fingerprint

LopesObjective = Literal["top_layer", "all_layers", "spectral_all_layers", "spectral_layer_pairs"]
OBJECTIVES = ("top_layer", "all_layers", "spectral_all_layers", "spectral_layer_pairs")


def check_objective(objective: str, layers: Sequence[str] | None) -> None:
    """One line unless ``objective`` is one of :data:`OBJECTIVES` and takes the ``layers`` given."""
    if objective not in OBJECTIVES:
        raise InvalidArgument(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    if objective == "top_layer" and layers is not None:
        raise InvalidArgument(f"the top_layer objective matches the logits alone; `layers` {list(layers)} apply to "
                              "all_layers and the spectral objectives")
    if layers is None:
        return
    if not len(layers) or len(set(layers)) != len(layers):
        raise InvalidArgument(f"layers must name each matched layer once (or be left out: every recorded one), got "
                              f"{list(layers)}")
    if objective.startswith("spectral") and LOGITS in layers:
        raise InvalidArgument(f"the spectral objectives match recorded nn.Linear outputs; {LOGITS!r} in layers "
                              f"{list(layers)} is not one (the logits are matched by top_layer and all_layers)")


def matched_layers(metadata: Metadata, objective: LopesObjective, layers: Sequence[str] | None,
                   network: nn.Module | None = None) -> list[str]:
    """The recorded layers an objective matches, in the file's order (``top_layer``: the logits alone; the spectral
    ones: by default every recorded ``nn.Linear`` output of ``network``)."""
    check_objective(objective, layers)
    if objective == "top_layer":
        return [LOGITS]
    if objective.startswith("spectral") and layers is None:
        if network is None:
            raise ZSKDError("the spectral objectives find the recorded linear layers in the teacher's network")
        layers = [name for name in metadata.layers if name != LOGITS and isinstance(submodule(network, name), nn.Linear)]
    unknown = [name for name in layers or () if name not in metadata.layers]
    if unknown:
        raise ZSKDError(f"layers {unknown} are not in the metadata (it records {list(metadata.layers)})")
    # the file's order whatever the order given (the recorder's `layers` order; its default is the network's
    # module order): the spectral graphs chain the layers in it
    return [name for name in metadata.layers if layers is None or name in layers]


def target_layout(metadata: Metadata, objective: LopesObjective, layers: Sequence[str] | None,
                  network: nn.Module | None = None) -> list[str]:
    """The layers drawn per impression, in target order: the matched ones, the logits always last (the cache keeps
    that last part as the method's targets)."""
    return [name for name in matched_layers(metadata, objective, layers, network) if name != LOGITS] + [LOGITS]


def linear_chain(network: nn.Module, names: Sequence[str]) -> list[nn.Linear]:
    """The ``nn.Linear`` modules at ``names``, checked to feed one another in order (at least two)."""
    modules = [submodule(network, name) for name in names]
    if len(modules) < 2 or not all(isinstance(m, nn.Linear) for m in modules):
        raise ZSKDError(f"the spectral objectives need two or more recorded nn.Linear layers in a chain, got {list(names)}")
    for (a, first), (b, second) in zip(zip(names, modules), zip(names[1:], modules[1:])):
        if second.in_features != first.out_features:
            raise ZSKDError(f"spectral objectives: {a} ({first.out_features} outputs) does not feed {b} "
                            f"({second.in_features} inputs): the layers chain in the metadata file's order, the "
                            "recorder's `layers`; record them in forward order")
    return modules


def low_frequency_basis(linears: Sequence[nn.Linear], fraction: float) -> Tensor:
    """``[n, k]`` float64: the ``k = ceil(fraction * n)`` eigenvectors of the normalized graph Laplacian
    ``I - D^-1/2 A D^-1/2`` with the smallest eigenvalues, over the ``n`` output units of ``linears`` (edges: ``|W|``
    between consecutive layers). (The combinatorial ``D - A`` was tried first: its lowest eigenvectors sit on
    weakly connected units and kept nothing of the MNIST record, ``benchmarks/lopes_spectral_fit.py``.)

    Where ``k`` falls inside a group of equal eigenvalues, the vectors taken from it are LAPACK's choice, not the
    teacher's: a pair of layers is a bipartite graph, whose ``A`` has rank at most twice the narrower layer, so the
    eigenvalue 1 repeats (LeNet-5's FC-2 / logits pair at 0.25: 10 vectors of distinct eigenvalues, then 14 of 74
    with eigenvalue 1). They are the same on one machine and library build, not necessarily elsewhere; cutting at
    the group's edge would change the measured rows (left for a re-measurement)."""
    sizes = [m.out_features for m in linears]
    offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    adjacency = torch.zeros(offsets[-1], offsets[-1], dtype=torch.float64)
    for i, consumer in enumerate(linears[1:]):
        weight = consumer.weight.detach().abs().double().cpu()  # [d_{i+1}, d_i]
        adjacency[offsets[i + 1] : offsets[i + 2], offsets[i] : offsets[i + 1]] = weight
        adjacency[offsets[i] : offsets[i + 1], offsets[i + 1] : offsets[i + 2]] = weight.T
    degree = adjacency.sum(1).clamp_min(1e-12)
    scale = degree.rsqrt()
    laplacian = torch.eye(offsets[-1], dtype=torch.float64) - scale[:, None] * adjacency * scale[None, :]
    _, vectors = torch.linalg.eigh(laplacian)
    return vectors[:, : max(1, math.ceil(fraction * offsets[-1]))]


class RecordedActivationTargets(TargetSampler):
    """Targets ``[N, D]``: for impression ``i`` of class ``c = i mod K``, every matched layer's activation drawn
    from the class's recorded Gaussian (``mean + L z``, ``L`` the Cholesky factor of ``covariance + eps * I``; a
    layer kept as variances: ``mean + std * z``), flattened and concatenated in layer order (float32)."""

    def __init__(self, metadata: str, objective: LopesObjective = "all_layers", layers: Sequence[str] | None = None,
                 eps: float = 1e-6) -> None:
        check_objective(objective, layers)
        self.metadata, self.objective, self.layers, self.eps = metadata, objective, layers, float(eps)
        self.record: Metadata | None = None
        self.factors: dict[str, tuple[Tensor, Tensor, bool]] = {}  # name -> (mean [K, d], factor, full?)

    def setup(self, context: SynthesisContext, rng: ChunkRandomness) -> None:
        self.record = read_metadata(self.metadata, teacher_fingerprint=module_fingerprint(context.network))
        if self.record.header["num_classes"] != context.num_classes:
            raise ZSKDError(f"metadata {self.metadata} has {self.record.header['num_classes']} classes; the teacher "
                            f"{context.num_classes}")
        self.factors = {}
        for name in target_layout(self.record, self.objective, self.layers, context.network):
            layer = self.record.layers[name]
            if layer.kept == "full":
                eye = torch.eye(layer.spread.shape[-1], dtype=torch.float64)
                factor, info = torch.linalg.cholesky_ex(layer.spread + self.eps * eye)
                if int(info.max()):
                    classes = (info > 0).nonzero().flatten().tolist()
                    raise ZSKDError(f"metadata {self.metadata}: the covariance of {name!r} is not positive definite "
                                    f"for class(es) {classes[:10]}; raise eps (now {self.eps})")
                self.factors[name] = (layer.mean, factor, True)
            else:
                self.factors[name] = (layer.mean, layer.std, False)

    def sample(self, chunk: Chunk, context: SynthesisContext) -> tuple[Tensor, Tensor]:
        classes = balanced_classes(chunk.indices, context.num_classes)
        draws = []
        for mean, factor, full in self.factors.values():
            z = torch.from_numpy(chunk.rng.numpy.standard_normal((len(classes), mean.shape[1])))
            if full:  # class by class: gathering [N, d, d] factors would cost N * d^2 memory
                spread = torch.empty_like(z)
                for k in classes.unique().tolist():
                    rows = classes == k
                    spread[rows] = z[rows] @ factor[k].T
            else:
                spread = factor[classes] * z
            draws.append(mean[classes] + spread)
        return torch.cat(draws, dim=1).float(), classes


class RecordedActivationMatching(Objective):
    """Per sample: the sum over matched layers of the mean squared difference between the teacher's activation
    (the logits divided by the recorded temperature, for ``"logits"``) and its target: each layer weighs
    ``1 / size`` times its sum of squares, so wide layers do not drown narrow ones. ``[N]``."""

    def __init__(self, metadata: str, objective: LopesObjective = "all_layers",
                 layers: Sequence[str] | None = None) -> None:
        check_objective(objective, layers)
        self.metadata, self.objective, self.layers = metadata, objective, layers
        self._layout: list[tuple[str, int, bool]] = []  # (layer, width, matched?) in target order
        self._temperature = 1.0

    def _read_layout(self, network: nn.Module) -> Metadata:
        record = read_metadata(self.metadata)
        self._temperature = float(record.header["temperature"])
        matched = set(matched_layers(record, self.objective, self.layers, network))
        self._layout = [(name, int(record.header["layers"][name]["dim"]), name in matched)
                        for name in target_layout(record, self.objective, self.layers, network)]
        return record

    def setup(self, context: SynthesisContext, rng: ChunkRandomness) -> None:
        self._read_layout(context.network)

    def taps(self, network: nn.Module) -> Sequence[Tap]:
        if not self._layout:
            self._read_layout(network)
        return [Tap(name) for name, _, matched in self._layout if matched and name != LOGITS]

    def activation(self, response: Response, name: str, dim: int) -> Tensor:
        """The teacher's activation of layer ``name`` (logits / T for ``"logits"``) as ``[N, dim]`` float32; a
        width other than the recorded ``dim`` (metadata recorded at another input shape) is a one-line error."""
        activation = response.logits / self._temperature if name == LOGITS else response.features[name]
        if math.prod(activation.shape[1:]) != dim:
            raise ZSKDError(f"{self.metadata}: layer {name!r} was recorded with {dim} values per input, the teacher "
                            f"gives {list(activation.shape[1:])} at this input shape: record the metadata at the "
                            "input shape synthesized")
        return activation.float().flatten(1)

    def __call__(self, response: Response, targets: Tensor) -> Tensor:
        loss, offset = 0.0, 0
        for name, dim, matched in self._layout:
            if matched:
                loss = loss + (self.activation(response, name, dim) - targets[:, offset : offset + dim]).pow(2).mean(1)
            offset += dim
        return loss


class SpectralMatching(RecordedActivationMatching):
    """Per sample: for each graph (one over all recorded linear layers, or one per consecutive pair), the mean
    squared difference of the low-frequency graph-Fourier coefficients ``U^T a`` of the teacher's activations
    and of the drawn targets (module docstring), summed over graphs. ``[N]``."""

    def __init__(self, metadata: str, objective: LopesObjective = "spectral_layer_pairs",
                 layers: Sequence[str] | None = None, fraction: float = 0.25) -> None:
        if not 0 < fraction <= 1:
            raise InvalidArgument(f"spectral_fraction must be in (0, 1], got {fraction}")
        super().__init__(metadata, objective, layers)
        self.fraction = float(fraction)
        self._graphs: list[tuple[list[tuple[int, int]], Tensor]] = []  # (target column ranges, basis [n, k])
        self._names: list[list[str]] = []  # the layers of each graph

    def setup(self, context: SynthesisContext, rng: ChunkRandomness) -> None:
        super().setup(context, rng)
        network = context.network
        names = [name for name, _, matched in self._layout if matched]
        starts = {name: sum(dim for _, dim, _ in self._layout[:i]) for i, (name, _, _) in enumerate(self._layout)}
        dims = {name: dim for name, dim, _ in self._layout}
        pairs = [names[i : i + 2] for i in range(len(names) - 1)]
        groups = [names] if self.objective == "spectral_all_layers" or not pairs else pairs  # one layer: refused
        self._graphs = [([(starts[n], starts[n] + dims[n]) for n in group],
                         low_frequency_basis(linear_chain(network, group), self.fraction).float()) for group in groups]
        self._names = groups

    def __call__(self, response: Response, targets: Tensor) -> Tensor:
        loss = 0.0
        for group, (columns, basis) in zip(self._names, self._graphs):
            value = torch.cat([self.activation(response, name, b - a) for name, (a, b) in zip(group, columns)], dim=1)
            target = torch.cat([targets[:, a:b] for a, b in columns], dim=1)
            loss = loss + ((value - target) @ basis.to(value.device)).pow(2).mean(1)
        return loss


class LopesSynthesizer(Synthesizer):
    """Lopes et al. 2017: impressions whose activations match draws from the recorded per-class statistics.

    Args:
        metadata: the metadata file recorded from this teacher (``zskd record``); its sha256 is part of the
            cache's identity, so new metadata never reuses old impressions.
        objective: ``"top_layer"`` (logits / T), ``"all_layers"`` (every recorded layer, or ``layers``),
            ``"spectral_all_layers"`` or ``"spectral_layer_pairs"`` (module docstring).
        layers: the recorded layers ``all_layers`` or a spectral objective matches (default: all of them; the
            spectral ones: every recorded ``nn.Linear``).
        spectral_fraction: the fraction of graph-Fourier coefficients a spectral objective keeps.
        pixel_init: ``(mean, std)``: start from ``N(mean, std)`` pixel values clamped to [0, 1] (the authors' MNIST
            start: (0.15, 0.1)); ``None``: the loop's ``init``.
        eps: added to each covariance's diagonal before its Cholesky factor.
        synthesizer_settings: the loop's settings of :class:`~zskd_lightning.synthesis.inversion.Synthesizer`.

    The cache keeps, as the method's targets, the drawn logits / T ``[N, K]`` (the other layers' draws are used
    during synthesis only).
    """

    identity_name = "lopes2017"

    def __init__(self, metadata: str, objective: LopesObjective = "all_layers", layers: Sequence[str] | None = None,
                 eps: float = 1e-6, spectral_fraction: float = 0.25, pixel_init: Sequence[float] | None = None,
                 **synthesizer_settings: Any) -> None:
        if pixel_init is not None and (len(pixel_init) != 2 or pixel_init[1] < 0):
            raise InvalidArgument(f"pixel_init is (mean, std >= 0), got {pixel_init}")
        check_objective(objective, layers)
        matching = (SpectralMatching(metadata, objective, layers, spectral_fraction) if objective.startswith("spectral")
                    else RecordedActivationMatching(metadata, objective, layers))
        super().__init__(
            target_sampler=RecordedActivationTargets(metadata, objective, layers, eps),
            objective=matching,
            **synthesizer_settings,
        )
        self.metadata = metadata
        self.pixel_init = None if pixel_init is None else (float(pixel_init[0]), float(pixel_init[1]))

    def initial_inputs(self, n: int, context: SynthesisContext, generator: torch.Generator) -> Tensor:
        """``pixel_init`` noise in pixel space when given (and the input range is known), else the loop's."""
        if self.pixel_init is None or context.input_range is None:
            return super().initial_inputs(n, context, generator)
        mean, std = self.pixel_init
        return from_pixels(pixel_noise((n, *context.input_spec.shape), mean, std, generator), context.input_range)

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "metadata_sha256": read_metadata(self.metadata).sha256}

    def invert(self, context: SynthesisContext, chunk: Chunk, progress=None) -> SynthesisResult:
        """The base loop; the cache keeps only the drawn logits / T (the last ``K`` target columns)."""
        result = super().invert(context, chunk, progress=progress)
        return replace(result, targets=result.targets[:, -context.num_classes :].contiguous())
