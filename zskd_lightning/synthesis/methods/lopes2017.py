"""Data-free distillation from activation metadata (Lopes, Fenu and Starner, "Data-Free Knowledge Distillation
for Deep Neural Networks", 2017, arXiv 1710.07535).

The teacher's owner records per-class statistics of chosen layers on the real training set
(:mod:`zskd_lightning.metadata`). Each impression of class ``c`` gets targets drawn from the class's recorded
Gaussian of every layer it matches, and its input is optimized until the teacher's activations reach them:
``top_layer`` matches the logits divided by the recorded temperature, ``all_layers`` every recorded layer.
Departures from the authors' public code, on purpose: draws are ``mean + L z`` with ``L`` the Cholesky factor of
the covariance (not ``mean + Sigma z``), no ReLU on targets or outputs (negative logits are matched too).
The spectral objectives are not built yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from zskd_lightning.errors import InvalidArgument, ZSKDError
from zskd_lightning.metadata.file import LOGITS, Metadata, read_metadata
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
from zskd_lightning.taps import Tap
from zskd_lightning.teacher import module_fingerprint

LopesObjective = Literal["top_layer", "all_layers"]


def matched_layers(metadata: Metadata, objective: LopesObjective, layers: Sequence[str] | None) -> list[str]:
    """The recorded layers an objective matches, in the file's order (``top_layer``: the logits alone)."""
    if objective == "top_layer":
        return [LOGITS]
    chosen = list(metadata.layers) if layers is None else list(layers)
    unknown = [name for name in chosen if name not in metadata.layers]
    if unknown:
        raise ZSKDError(f"layers {unknown} are not in the metadata (it records {list(metadata.layers)})")
    return chosen


def target_layout(metadata: Metadata, objective: LopesObjective, layers: Sequence[str] | None) -> list[str]:
    """The layers drawn per impression, in target order: the matched ones, the logits always last (the cache keeps
    that last part as the method's targets)."""
    return [name for name in matched_layers(metadata, objective, layers) if name != LOGITS] + [LOGITS]


class RecordedActivationTargets(TargetSampler):
    """Targets ``[N, D]``: for impression ``i`` of class ``c = i mod K``, every matched layer's activation drawn
    from the class's recorded Gaussian (``mean + L z``, ``L`` the Cholesky factor of ``covariance + eps * I``; a
    layer kept as variances: ``mean + std * z``), flattened and concatenated in layer order (float32)."""

    def __init__(self, metadata: str, objective: LopesObjective = "all_layers", layers: Sequence[str] | None = None,
                 eps: float = 1e-6) -> None:
        self.metadata, self.objective, self.layers, self.eps = metadata, objective, layers, float(eps)
        self.record: Metadata | None = None
        self.factors: dict[str, tuple[Tensor, Tensor, bool]] = {}  # name -> (mean [K, d], factor, full?)

    def setup(self, context: SynthesisContext, rng: ChunkRandomness) -> None:
        self.record = read_metadata(self.metadata, teacher_fingerprint=module_fingerprint(context.network))
        if self.record.header["num_classes"] != context.num_classes:
            raise ZSKDError(f"metadata {self.metadata} has {self.record.header['num_classes']} classes; the teacher "
                            f"{context.num_classes}")
        self.factors = {}
        for name in target_layout(self.record, self.objective, self.layers):
            layer = self.record.layers[name]
            if layer.kept == "full":
                eye = torch.eye(layer.spread.shape[-1], dtype=torch.float64)
                factor, info = torch.linalg.cholesky_ex(layer.spread + self.eps * eye)
                if int(info.max()):
                    raise ZSKDError(f"the covariance of {name!r} is not positive definite for some class; raise eps "
                                    f"(now {self.eps})")
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
        self.metadata, self.objective, self.layers = metadata, objective, layers
        self._layout: list[tuple[str, int, bool]] = []  # (layer, width, matched?) in target order
        self._temperature = 1.0

    def _read_layout(self) -> None:
        record = read_metadata(self.metadata)
        self._temperature = float(record.header["temperature"])
        matched = set(matched_layers(record, self.objective, self.layers))
        self._layout = [(name, int(record.header["layers"][name]["dim"]), name in matched)
                        for name in target_layout(record, self.objective, self.layers)]

    def taps(self, network: nn.Module) -> Sequence[Tap]:
        self._read_layout()
        return [Tap(name) for name, _, matched in self._layout if matched and name != LOGITS]

    def __call__(self, response: Response, targets: Tensor) -> Tensor:
        loss, offset = 0.0, 0
        for name, dim, matched in self._layout:
            if matched:
                value = response.logits / self._temperature if name == LOGITS else response.features[name]
                loss = loss + (value.float().flatten(1) - targets[:, offset : offset + dim]).pow(2).mean(1)
            offset += dim
        return loss


class LopesSynthesizer(Synthesizer):
    """Lopes et al. 2017: impressions whose activations match draws from the recorded per-class statistics.

    Args:
        metadata: the metadata file recorded from this teacher (``zskd record``); its sha256 is part of the
            cache's identity, so new metadata never reuses old impressions.
        objective: ``"top_layer"`` (logits / T) or ``"all_layers"`` (every recorded layer, or ``layers``).
        layers: the recorded layers ``all_layers`` matches (default: all of them).
        eps: added to each covariance's diagonal before its Cholesky factor.
        synthesizer_settings: the loop's settings of :class:`~zskd_lightning.synthesis.inversion.Synthesizer`.

    The cache keeps, as the method's targets, the drawn logits / T ``[N, K]`` (the other layers' draws are used
    during synthesis only).
    """

    identity_name = "lopes2017"

    def __init__(self, metadata: str, objective: LopesObjective = "all_layers", layers: Sequence[str] | None = None,
                 eps: float = 1e-6, **synthesizer_settings: Any) -> None:
        if objective not in ("top_layer", "all_layers"):
            raise InvalidArgument(f"objective must be 'top_layer' or 'all_layers', got {objective!r}")
        super().__init__(
            target_sampler=RecordedActivationTargets(metadata, objective, layers, eps),
            objective=RecordedActivationMatching(metadata, objective, layers),
            **synthesizer_settings,
        )
        self.metadata = metadata

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "metadata_sha256": read_metadata(self.metadata).sha256}

    def invert(self, context: SynthesisContext, chunk: Chunk, progress=None) -> SynthesisResult:
        """The base loop; the cache keeps only the drawn logits / T (the last ``K`` target columns)."""
        result = super().invert(context, chunk, progress=progress)
        return replace(result, targets=result.targets[:, -context.num_classes :].contiguous())
