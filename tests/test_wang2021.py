"""Wang 2021 (soft targets from a Gaussian over the teacher's features): sampler, head, objective, method."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny
from helpers.tiny import one_torch_thread  # noqa: F401  (module-wide autouse fixture)
from torch import nn

from zskd_lightning import WangSynthesizer
from zskd_lightning.errors import ZSKDError
from zskd_lightning.models import LeNet5
from zskd_lightning.pixels import InputSpec
from zskd_lightning.synthesis import Chunk, ChunkRandomness, GaussianFeatureTargets, SynthesisContext
from zskd_lightning.synthesis.methods.wang2021 import feature_layer, weight_correlation
from zskd_lightning.taps import FeatureTaps, Tap, run_from
from zskd_lightning.teacher import FrozenTeacher

MNIST_SPEC = InputSpec((1, 32, 32), (0.1307,), (0.3081,))


@pytest.fixture(scope="module")
def lenet() -> FrozenTeacher:
    torch.manual_seed(0)
    return FrozenTeacher(network=LeNet5(1, 10))


def context_for(teacher, spec=MNIST_SPEC) -> SynthesisContext:
    return SynthesisContext(teacher=teacher, input_spec=spec, num_classes=10)


def sampler_for(teacher, **kwargs) -> GaussianFeatureTargets:
    sampler = GaussianFeatureTargets(**kwargs)
    sampler.setup(context_for(teacher), ChunkRandomness.for_setup(0))
    return sampler


def test_default_layer_is_the_input_of_the_classifier(lenet):
    tap, width, consumer, producer = feature_layer(lenet.network, None, "input")
    linears = [m for m in lenet.network.modules() if isinstance(m, nn.Linear)]
    assert width == 84 and consumer is linears[-1] and producer is linears[-2]
    assert tap.where == "input" and lenet.network.get_submodule(tap.path) is linears[-1]


@pytest.mark.parametrize("reading", ["outgoing", "incoming"])
def test_correlation_is_a_correlation_matrix(lenet, reading):
    _, width, consumer, producer = feature_layer(lenet.network, None, "input")
    r = weight_correlation(consumer, producer, reading)
    assert r.shape == (width, width) and r.dtype == torch.float64
    torch.testing.assert_close(r, r.T)
    torch.testing.assert_close(r.diagonal(), torch.ones(width, dtype=torch.float64))
    rank = int(torch.linalg.matrix_rank(r))
    assert rank <= 10 if reading == "outgoing" else rank == width  # K = 10 classes; fan-in 120 > 84


@pytest.mark.parametrize("reading", ["outgoing", "incoming"])
def test_sampled_features_have_covariance_sigma_r(lenet, reading):
    sigma = 1.5
    sampler = sampler_for(lenet, sigma=sigma, correlation=reading)
    features = sampler.sample_features(100_000, ChunkRandomness.for_chunk(0, 0).numpy).double()
    covariance = features.T @ features / len(features)  # mean 0 by construction
    target = sigma * weight_correlation(*feature_layer(lenet.network, None, "input")[2:], reading)
    # every covariance within 2% of its scale sqrt(Sigma_ii Sigma_jj) (= sigma: R has a unit diagonal), so every
    # variance within 2% of sigma; the sampling error of one entry is about 1.4 / sqrt(100,000) = 0.45% of it
    scale = target.diagonal().sqrt()
    standardized = (covariance - target).abs() / (scale[:, None] * scale[None, :])
    assert standardized.max() < 0.02, float(standardized.max())
    assert features.mean(0).abs().max() < 0.05


def test_head_run_on_tapped_features_gives_the_teachers_logits(lenet):
    inputs = torch.randn(16, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    tap = feature_layer(lenet.network, None, "input")[0]
    with FeatureTaps(lenet.network, [tap]) as taps, torch.no_grad():
        logits = lenet(inputs)
        features = taps.features[tap.key]
    with torch.no_grad():
        head = run_from(lenet.network, tap, features, MNIST_SPEC.shape)
    torch.testing.assert_close(head, logits, rtol=1e-5, atol=1e-5)


def test_targets_are_the_softened_head_of_sampled_features(lenet):
    sampler = sampler_for(lenet, temperature=20.0)
    chunk = Chunk.of(0, 3, 0, 32)
    targets, labels = sampler.sample(chunk, context_for(lenet))
    features = sampler.sample_features(32, ChunkRandomness.for_chunk(0, 3).numpy)
    with torch.no_grad():
        expected = torch.softmax(lenet.network.classifier[-1](features) / 20.0, dim=-1)
    torch.testing.assert_close(targets, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(labels, targets.argmax(1))
    assert torch.equal(sampler.sample(Chunk.of(0, 3, 0, 32), context_for(lenet))[0], targets)  # (seed, chunk) alone


def test_balanced_targets_give_class_i_mod_k_as_the_heads_argmax(lenet):
    sampler = sampler_for(lenet, temperature=20.0, balanced=True)
    chunk = Chunk.of(0, 2, 40, 70)  # global indices 40-69: classes 0-9 three times
    targets, labels = sampler.sample(chunk, context_for(lenet))
    assert torch.equal(labels, torch.arange(40, 70) % 10)
    torch.testing.assert_close(targets.sum(1), torch.ones(30))
    assert torch.equal(sampler.sample(Chunk.of(0, 2, 40, 70), context_for(lenet))[0], targets)  # (seed, chunk)
    unbalanced = sampler_for(lenet, temperature=20.0).sample(Chunk.of(0, 2, 40, 70), context_for(lenet))[1]
    assert not torch.equal(unbalanced, labels)


def test_a_list_of_sigmas_spreads_them_over_index_blocks_of_k(lenet):
    sampler = sampler_for(lenet, sigma=[1.5, 40.0], temperature=20.0)
    targets, _ = sampler.sample(Chunk.of(0, 3, 0, 40), context_for(lenet))
    rng = ChunkRandomness.for_chunk(0, 3).numpy  # group 0 (indices 0-9, 20-29) draws first, then group 1
    first, second = sampler.sample_features(20, rng, 0), sampler.sample_features(20, rng, 1)
    with torch.no_grad():
        head = lenet.network.classifier[-1]
        expected = torch.softmax(torch.cat([head(first[:10]), head(second[:10]), head(first[10:]),
                                            head(second[10:])]) / 20.0, dim=-1)
    torch.testing.assert_close(targets, expected, rtol=1e-5, atol=1e-6)
    spread = sampler.sample_features(20_000, ChunkRandomness.for_chunk(0, 4).numpy, 1).var(0)
    assert 0.95 * 40.0 < spread.mean() < 1.05 * 40.0  # R has a unit diagonal


class Unreachable(nn.Module):
    """A head whose class 2 is never the argmax: its logit is the others' minimum minus one."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        two = self.fc(x)
        return torch.cat([two, two.min(1, keepdim=True).values - 1], dim=1)


def test_balanced_targets_refuse_an_unreachable_class_in_one_line():
    teacher = FrozenTeacher(network=Unreachable())
    context = SynthesisContext(teacher=teacher, input_spec=InputSpec((4,)), num_classes=3)
    sampler = GaussianFeatureTargets(layer="fc", where="input", correlation="outgoing", balanced=True)
    sampler.setup(context, ChunkRandomness.for_setup(0))
    # 64 rounds of 4 x 6 draws fill the 2 slots of a class: reachable ones come out at least once in 4 x 64 x 3
    with pytest.raises(ZSKDError, match=r"classes \[2\] are the teacher's argmax for under about 1 in 768 draws"
                       ) as caught:
        sampler.sample(Chunk.of(0, 0, 0, 6), context)
    assert "\n" not in str(caught.value)


class Skip(nn.Module):
    """A network whose head also reads an earlier activation: a skip connection around ``fc``, whose input is
    the modelled layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.out(self.fc(h) + h)


def test_a_head_that_reads_earlier_layers_is_refused_in_one_line():
    teacher = FrozenTeacher(network=Skip())
    with pytest.raises(ZSKDError, match="also read earlier activations") as caught:
        sampler = GaussianFeatureTargets(layer="fc", where="input", correlation="outgoing")
        sampler.setup(SynthesisContext(teacher=teacher, input_spec=InputSpec((4,)), num_classes=3),
                      ChunkRandomness.for_setup(0))
        sampler.sample(Chunk.of(0, 0, 0, 8), SynthesisContext(teacher, InputSpec((4,)), 3))
    assert "\n" not in str(caught.value)


def test_where_without_a_layer_is_refused_in_one_line(lenet):
    """Without ``layer`` the modelled features are the last linear's input: an ``output`` asked for is not there
    (refused when the method is made, not at synthesis, whose cache folder would already name the setting)."""
    assert feature_layer(lenet.network, None, "input")[0] == Tap("classifier.5", "input")
    with pytest.raises(ZSKDError, match=r"^where='output' needs a `layer`"):
        feature_layer(lenet.network, None, "output")
    for make in (lambda: WangSynthesizer(where="output"), lambda: GaussianFeatureTargets(where="output")):
        with pytest.raises(ZSKDError, match=r"^where='output' needs a `layer`"):
            make()  # at construction: before a cache folder is written with the setting


def test_a_layer_that_is_not_linear_is_refused(lenet):
    with pytest.raises(ZSKDError, match="nn.Linear"):
        sampler_for(lenet, layer="features.0")
    with pytest.raises(ZSKDError, match="no submodule"):
        sampler_for(lenet, layer="nowhere")


def test_wang_impressions_reach_their_soft_targets():
    teacher = tiny.shipped_teacher()
    spec = InputSpec(tiny.INPUT_SHAPE, tiny.DIGITS_MEAN, tiny.DIGITS_STD)
    context = SynthesisContext(teacher=teacher, input_spec=spec, num_classes=10)
    synthesizer = WangSynthesizer(sigma=1.5, iterations=60, lr=0.1)
    synthesizer.setup(context)
    first = synthesizer.invert(context, Chunk.of(0, 0, 0, 32), progress=None)
    fewer = WangSynthesizer(sigma=1.5, iterations=1, lr=0.1)
    fewer.setup(context)
    start = fewer.invert(context, Chunk.of(0, 0, 0, 32))
    assert torch.equal(first.targets, start.targets)
    # the loss is T^2 * CE(target, softmax(logits / T)) = T^2 * (H(target) + KL(target || teacher)) (plus the
    # activation term): the KL part falls by over half
    scale = synthesizer.objective.scale
    assert scale == 20.0**2  # matching_scale "t_squared" by default
    entropy = float(-(first.targets * first.targets.log()).sum(1).mean())
    assert first.loss.mean() / scale - entropy < 0.5 * (start.loss.mean() / scale - entropy)
    with torch.no_grad():
        agreement = (teacher(first.inputs).argmax(1) == first.labels).float().mean()
        initial = (teacher(start.inputs).argmax(1) == start.labels).float().mean()
    assert agreement >= initial + 0.2, (float(initial), float(agreement))
    identity = synthesizer.identity()
    assert identity["name"] == "wang2021" and identity["args"]["sigma"] == 1.5
    assert identity["args"]["correlation"] == "outgoing" and identity["args"]["activation_weight"] == 0.05


def test_activation_term_reads_the_tapped_features():
    teacher = tiny.shipped_teacher()
    spec = InputSpec(tiny.INPUT_SHAPE, tiny.DIGITS_MEAN, tiny.DIGITS_STD)
    context = SynthesisContext(teacher=teacher, input_spec=spec, num_classes=10)
    plain = WangSynthesizer(iterations=20, lr=0.1, activation_weight=0.0)
    strong = WangSynthesizer(iterations=20, lr=0.1, activation_weight=5.0)
    results = []
    for synthesizer in (plain, strong):
        synthesizer.setup(context)
        results.append(synthesizer.invert(context, Chunk.of(0, 0, 0, 32)).inputs)
    tap = Tap(feature_layer(teacher.network, None, "input")[0].path, "input")
    magnitudes = []
    for inputs in results:
        with FeatureTaps(teacher.network, [tap]) as taps, torch.no_grad():
            teacher(inputs)
            magnitudes.append(float(taps.features[tap.key].abs().mean()))
    assert magnitudes[1] > magnitudes[0]


def test_rectified_features_are_the_relu_of_the_gaussian_draws(lenet):
    plain, rectified = sampler_for(lenet), sampler_for(lenet, rectify=True)
    targets, _ = rectified.sample(Chunk.of(0, 1, 0, 16), context_for(lenet))
    features = plain.sample_features(16, ChunkRandomness.for_chunk(0, 1).numpy).clamp_min(0)
    with torch.no_grad():
        expected = torch.softmax(lenet.network.classifier[-1](features) / 20.0, dim=-1)
    torch.testing.assert_close(targets, expected, rtol=1e-5, atol=1e-6)
