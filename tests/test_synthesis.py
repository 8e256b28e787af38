"""Synthesizers, target samplers and regularizers (CPU, seconds).

Teachers: ``helpers.tiny.shipped_teacher()`` (the package's trained digits DigitsConvNet) where impressions must
actually reach their targets; fixed-seed tiny nets (``helpers.tiny.make_net``) where only the mechanics matter.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny
from helpers.tiny import one_torch_thread  # noqa: F401  (module-wide autouse fixture)
from torch import nn
from torch.utils.data import DataLoader

from zskd_lightning import ClassImpressionSynthesizer, ZSKDSynthesizer
from zskd_lightning.errors import InvalidArgument, ZSKDError
from zskd_lightning.pixels import InputSpec
from zskd_lightning.synthesis.methods import FeatureActivation
from zskd_lightning.synthesis import (
    BatchNormStatistics,
    Chunk,
    ChunkRandomness,
    DirichletTargets,
    Disagreement,
    L2Prior,
    PixelL2Prior,
    OneHotTargets,
    Response,
    SoftTargetCrossEntropy,
    SynthesisContext,
    Synthesizer,
    TotalVariation,
    class_similarity,
)
from zskd_lightning.taps import FeatureTaps
from zskd_lightning.teacher import as_frozen_teacher

K = 10
RANGE = tiny.digits_input_range()


@pytest.fixture(scope="module")
def trained_teacher():
    return tiny.shipped_teacher()


@pytest.fixture(scope="module")
def small_teacher():
    return as_frozen_teacher(tiny.make_net(0))


def context_for(teacher, normalized=True, seed=0, shape=tiny.INPUT_SHAPE, **kwargs) -> SynthesisContext:
    """A synthesis context for the digits input space (``normalized=False``: no known valid range)."""
    spec = InputSpec(shape, tiny.DIGITS_MEAN, tiny.DIGITS_STD) if normalized else InputSpec(shape)
    return SynthesisContext(teacher=teacher, input_spec=spec, num_classes=K, seed=seed, **kwargs)


#: For target samplers that read only the number of classes.
LABELS_ONLY = context_for(None)


def synthesize(synthesizer, teacher, n=8, seed=0, chunk=0, normalized=True, progress=None, **kwargs):
    """One chunk of ``n`` impressions with indices ``[chunk * n, chunk * n + n)`` (fresh randomness each call):
    ``(inputs, targets, labels, mean final loss)``."""
    context = context_for(teacher, normalized, seed, **kwargs)
    synthesizer.setup(context)
    result = synthesizer.invert(context, Chunk.of(seed, chunk, chunk * n, chunk * n + n), progress=progress)
    return result.inputs, result.targets, result.labels, float(result.loss.mean())


def teacher_loss(synthesizer, teacher, inputs, targets) -> float:
    """The synthesizer's objective (mean over the chunk) for ``inputs``."""
    with torch.no_grad():
        return float(synthesizer.objective(Response(teacher(inputs).float()), targets).mean())


def test_inversion_reads_a_student_in_eval_mode_and_leaves_it_as_it_was():
    """A part that reads the student (Disagreement) must not move its BatchNorm statistics or draw its dropout
    from the global stream (a chunk would depend on the rank that made it); its train mode comes back after."""
    torch.manual_seed(3)
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, K))
    statistics = {k: v.clone() for k, v in student.state_dict().items()}
    synthesizer = Synthesizer(OneHotTargets(), SoftTargetCrossEntropy(), regularizers=[Disagreement()], iterations=3)
    teacher = as_frozen_teacher(tiny.make_net(0))
    first = synthesize(synthesizer, teacher, student=student)[0]
    assert student.training and all(torch.equal(v, statistics[k]) for k, v in student.state_dict().items())
    torch.rand(5)  # the global stream moves on: the same chunk comes out the same
    assert torch.equal(synthesize(synthesizer, teacher, student=student)[0], first)


def test_inversion_gives_the_student_the_layout_it_trains_on():
    """The teacher runs on channels-last inputs; a student that .view()s its conv features would fail on them."""
    synthesizer = Synthesizer(OneHotTargets(), SoftTargetCrossEntropy(), regularizers=[Disagreement()], iterations=2,
                              channels_last=True)
    inputs = synthesize(synthesizer, as_frozen_teacher(tiny.make_net(0)), student=tiny.ViewNet())[0]
    assert torch.isfinite(inputs).all()


# ------------------------------------------------------------------------------------------ class similarity
def test_class_similarity_properties(trained_teacher):
    s = class_similarity(trained_teacher)
    assert s.shape == (K, K) and s.dtype == torch.float32
    torch.testing.assert_close(s, s.T, rtol=0, atol=1e-6)
    assert s.min() == 0 and s.max() == pytest.approx(1.0, abs=1e-6)
    assert (s >= 0).all() and (s <= 1).all()
    # each class is most similar to itself
    assert torch.equal(s.argmax(dim=1), torch.arange(K))
    assert (s.diagonal() >= 1 - 1e-5).all()
    # it is the min-max normalized cosine similarity of the LAST Linear's rows
    w = F.normalize(trained_teacher.network.classifier[-1].weight.detach(), dim=1)
    cos = w @ w.T
    torch.testing.assert_close(s, (cos - cos.min()) / (cos.max() - cos.min()), rtol=0, atol=1e-6)


def test_class_similarity_reads_only_the_last_linear():
    net = tiny.make_net(0)
    first, last = [m for m in net.modules() if isinstance(m, nn.Linear)]
    before = class_similarity(net)
    with torch.no_grad():
        first.weight.mul_(-3.0)
    assert torch.equal(class_similarity(net), before)
    with torch.no_grad():
        last.weight[0] = last.weight[1]
    after = class_similarity(net)
    assert not torch.equal(after, before)
    assert after[0, 1] == pytest.approx(1.0, abs=1e-6)  # identical class vectors are maximally similar


# ---------------------------------------------------------------------------------------------- targets
def dirichlet(teacher, betas=(1.0, 0.1)) -> DirichletTargets:
    sampler = DirichletTargets(betas)
    sampler.setup(context_for(teacher), ChunkRandomness.for_setup(0))
    return sampler


def test_dirichlet_rows_are_distributions_with_balanced_labels(trained_teacher):
    indices = torch.arange(100, 300)
    targets, labels = dirichlet(trained_teacher).sample(Chunk(indices, ChunkRandomness.for_chunk(0, 0)), LABELS_ONLY)
    assert targets.shape == (200, K) and targets.dtype == torch.float32 and labels.dtype == torch.int64
    assert (targets >= 0).all()
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(200), rtol=0, atol=1e-5)
    assert torch.equal(labels, indices % K)


def test_dirichlet_budget_splits_evenly_over_classes_and_betas(trained_teacher):
    betas = (1.0, 0.1)
    sampler = dirichlet(trained_teacher, betas)
    n = K * len(betas) * 3  # any multiple of K * len(betas) splits exactly evenly
    indices = torch.arange(n)
    alpha = sampler.concentrations(indices, K)
    similarity = class_similarity(trained_teacher).double()
    expected_beta = torch.tensor([betas[(i // K) % len(betas)] for i in range(n)], dtype=torch.float64)
    torch.testing.assert_close(alpha, expected_beta[:, None] * similarity[indices % K] + sampler.floor)
    pairs = [(i % K, betas[(i // K) % len(betas)]) for i in range(n)]
    counts = {pair: pairs.count(pair) for pair in set(pairs)}
    assert len(counts) == K * len(betas) and set(counts.values()) == {3}
    # the concentration peaks at the impression's own class
    assert torch.equal(alpha.argmax(dim=1), indices % K)


def test_dirichlet_randomness_comes_from_seed_and_chunk_only(trained_teacher):
    sampler = dirichlet(trained_teacher)
    indices = torch.arange(16, 32)

    def draw(seed, chunk):
        return sampler.sample(Chunk(indices, ChunkRandomness.for_chunk(seed, chunk)), LABELS_ONLY)[0]

    assert torch.equal(draw(0, 2), draw(0, 2))
    assert torch.equal(dirichlet(trained_teacher).sample(Chunk(indices, ChunkRandomness.for_chunk(0, 2)), LABELS_ONLY)[0], draw(0, 2))
    assert not torch.allclose(draw(0, 2), draw(0, 3))
    assert not torch.allclose(draw(0, 2), draw(1, 2))


def test_small_beta_gives_peakier_targets_than_large_beta(trained_teacher):
    """The authors' code re-normalized each concentration row, which made beta 1.0 and 0.1 identical."""
    indices = torch.arange(1000)
    peaks = {}
    for beta in (1.0, 0.1):
        targets, _ = dirichlet(trained_teacher, (beta,)).sample(Chunk(indices, ChunkRandomness.for_chunk(0, 0)), LABELS_ONLY)
        peaks[beta] = float(targets.max(dim=1).values.mean())
    assert peaks[0.1] > peaks[1.0] + 0.1, peaks
    # and inside one sampler with both betas, the two halves of the budget differ the same way
    targets, _ = dirichlet(trained_teacher).sample(Chunk(indices, ChunkRandomness.for_chunk(0, 0)), LABELS_ONLY)
    beta_small = (indices // K) % 2 == 1
    assert targets[beta_small].max(dim=1).values.mean() > targets[~beta_small].max(dim=1).values.mean() + 0.1


def test_dirichlet_rejects_bad_betas():
    with pytest.raises(ValueError, match=r"betas must be positive, got \(\)"):
        DirichletTargets(())
    with pytest.raises(ValueError, match=r"betas must be positive, got \(1.0, 0.0\)"):
        DirichletTargets((1.0, 0.0))


def test_dirichlet_targets_with_two_classes_are_one_hot_with_a_warning():
    """Min-max normalization maps any 2x2 cosine matrix to the identity: ZSKD becomes Class Impressions."""
    two_class = tiny.make_net(0, num_classes=2)
    sampler = DirichletTargets()
    spec = InputSpec(tiny.INPUT_SHAPE, tiny.DIGITS_MEAN, tiny.DIGITS_STD)
    with pytest.warns(UserWarning, match="ZSKD's targets with 2 classes are one-hot"):
        sampler.setup(SynthesisContext(teacher=two_class, input_spec=spec, num_classes=2), ChunkRandomness.for_setup(0))
    torch.testing.assert_close(sampler.similarity, torch.eye(2))


def test_a_stop_window_under_one_iteration_is_refused():
    with pytest.raises(InvalidArgument, match=r"^stop_window must be >= 1 iterations, got 0"):
        ZSKDSynthesizer(stop_tolerance=1e-3, stop_window=0)


def test_a_plateau_stop_beside_a_batch_statistic_is_refused():
    """Frozen impressions leave the forward pass, so the BatchNorm prior's chunk statistics shrank to the last few
    still optimizing (pushed alone to the running statistics), silently. Per-sample priors still take it."""
    with pytest.raises(InvalidArgument, match=r"^stop_tolerance freezes impressions one by one, and "
                                              r"BatchNormStatistics is a statistic of the whole chunk"):
        ZSKDSynthesizer(stop_tolerance=1e-3, regularizers=[TotalVariation(0.1), BatchNormStatistics(0.1)])
    ZSKDSynthesizer(stop_tolerance=1e-3, regularizers=[TotalVariation(0.1)])
    ZSKDSynthesizer(regularizers=[BatchNormStatistics(0.1)])


def test_the_activation_term_on_a_network_without_a_linear_layer_names_itself():
    """FastDFKD and SSD-KD add it by default: the error names the term and how to leave it out, not Wang 2021."""
    conv_head = nn.Sequential(nn.Conv2d(1, K, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ZSKDError, match=r"^Sequential has no nn.Linear layer whose features the activation term "
                                        r"\(FeatureActivation; a weight of 0 leaves it out\) could read"):
        FeatureActivation(0.1).taps(conv_head)


def test_one_hot_targets():
    indices = torch.arange(5, 30)
    targets, labels = OneHotTargets().sample(Chunk(indices, ChunkRandomness.for_chunk(0, 0)), LABELS_ONLY)
    assert torch.equal(labels, indices % K)
    assert torch.equal(targets, F.one_hot(indices % K, K).float())


# --------------------------------------------------------------------------- impressions reach their targets
def test_zskd_impressions_match_their_targets(trained_teacher):
    synthesizer = ZSKDSynthesizer(iterations=100, lr=0.05)
    inputs, targets, labels, loss = synthesize(synthesizer, trained_teacher, n=40)
    assert inputs.shape == (40, *tiny.INPUT_SHAPE) and inputs.dtype == torch.float32
    assert torch.equal(labels, torch.arange(40) % K)
    # the returned targets are the sampler's for this chunk
    expected, _ = synthesizer.target_sampler.sample(Chunk(torch.arange(40), ChunkRandomness.for_chunk(0, 0)), LABELS_ONLY)
    assert torch.equal(targets, expected)
    with torch.no_grad():
        predicted = trained_teacher(inputs).argmax(dim=1)
    agreement = (predicted == targets.argmax(dim=1)).float().mean().item()
    assert agreement >= 0.9, agreement
    x0 = synthesizer.initial_inputs(40, LABELS_ONLY, ChunkRandomness.for_chunk(0, 0).torch)
    assert loss < teacher_loss(synthesizer, trained_teacher, x0, targets)
    assert loss == pytest.approx(teacher_loss(synthesizer, trained_teacher, inputs, targets), rel=1e-3)


def test_class_impressions_match_their_classes(trained_teacher):
    inputs, targets, labels, _ = synthesize(ClassImpressionSynthesizer(iterations=100, lr=0.05), trained_teacher, n=40)
    assert torch.equal(targets.argmax(dim=1), labels)
    with torch.no_grad():
        predicted = trained_teacher(inputs).argmax(dim=1)
    agreement = (predicted == labels).float().mean().item()
    assert agreement >= 0.95, agreement


@pytest.mark.parametrize("init", ["uniform", "normal", "gray"])
def test_impressions_stay_inside_the_input_range(small_teacher, init):
    low, high = RANGE
    synthesizer = ZSKDSynthesizer(iterations=20, lr=1.0, init=init)  # a huge lr pushes far out of range
    inputs = synthesize(synthesizer, small_teacher, n=16)[0]
    assert inputs.min() >= low.min() and inputs.max() <= high.max()
    # the range is actually used (the clamp bites on both sides)
    assert (inputs == low).any() and (inputs == high).any()
    x0 = synthesizer.initial_inputs(16, LABELS_ONLY, ChunkRandomness.for_chunk(0, 0).torch)
    assert x0.min() >= low.min() and x0.max() <= high.max()


def test_synthesis_is_deterministic_per_chunk(small_teacher):
    first = synthesize(ZSKDSynthesizer(iterations=5), small_teacher, chunk=3)
    again = synthesize(ZSKDSynthesizer(iterations=5), small_teacher, chunk=3)
    other = synthesize(ZSKDSynthesizer(iterations=5), small_teacher, chunk=4)
    for a, b in zip(first[:3], again[:3]):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])


def test_identity_is_derived_from_the_constructor_arguments():
    identity = ZSKDSynthesizer(betas=(1.0, 0.1), temperature=20.0, iterations=7, lr=0.03,
                               regularizers=[TotalVariation(0.5), L2Prior(0.25)]).identity()
    assert identity["name"] == "zskd"  # the stable method name, not a module path
    args = identity["args"]
    assert args["iterations"] == 7 and args["lr"] == 0.03 and args["init"] == "uniform"  # a parent's default too
    assert args["betas"] == [1.0, 0.1] and args["temperature"] == 20.0 and args["concentration_floor"] == 1e-6
    assert args["regularizers"] == [{"name": "TotalVariation", "args": {"weight": 0.5}},
                                    {"name": "L2Prior", "args": {"weight": 0.25}}]
    assert args["jitter"] == 0 and args["precision"] is None and args["sample_weights"] is None
    assert "target_sampler" not in args  # built from the method's own arguments
    assert ClassImpressionSynthesizer().identity()["name"] == "class_impressions"
    assert ZSKDSynthesizer(jitter=2).identity() != ZSKDSynthesizer().identity()
    assert ZSKDSynthesizer(precision="bf16-mixed").identity()["args"]["precision"] == "bf16-mixed"
    with pytest.raises(ValueError):
        ZSKDSynthesizer(iterations=0)


def test_a_new_constructor_argument_is_part_of_the_identity_without_listing_it():
    class Shifted(ZSKDSynthesizer):
        identity_name = "shifted"

        def __init__(self, offset: float = 0.0, **settings):
            super().__init__(**settings)
            self.offset = offset

    assert Shifted(offset=1.0).identity()["args"]["offset"] == 1.0
    assert Shifted(offset=1.0).identity() != Shifted(offset=2.0).identity()


# ------------------------------------------------------------- gradients under Lightning's no-grad contexts
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_synthesis_optimizes_inside_no_grad_contexts(small_teacher, context):
    reference = synthesize(ZSKDSynthesizer(iterations=10, lr=0.05), small_teacher)
    with context():
        inputs, targets, labels, loss = synthesize(ZSKDSynthesizer(iterations=10, lr=0.05), small_teacher)
    assert torch.equal(inputs, reference[0]) and torch.equal(targets, reference[1])
    assert torch.equal(labels, reference[2]) and loss == reference[3]
    x0 = ZSKDSynthesizer().initial_inputs(8, LABELS_ONLY, ChunkRandomness.for_chunk(0, 0).torch)
    assert not torch.equal(inputs, x0)
    assert loss < teacher_loss(ZSKDSynthesizer(), small_teacher, x0, targets)


class SynthesizeInPredict(L.LightningModule):
    """``predict_step`` synthesizes one chunk per batch: runs under Lightning's ``inference_mode``."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher = as_frozen_teacher(teacher)
        self.synthesizer = ZSKDSynthesizer(iterations=10, lr=0.05)

    def predict_step(self, batch, batch_idx):
        assert torch.is_inference_mode_enabled()
        chunk = int(batch[0])
        context = context_for(self.teacher, device=self.device)
        self.synthesizer.setup(context)
        result = self.synthesizer.invert(context, Chunk.of(0, chunk, 8 * chunk, 8 * chunk + 8))
        return result.inputs, result.targets, result.labels, float(result.loss.mean())


def test_synthesis_optimizes_inside_trainer_predict(small_teacher, tmp_path):
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    assert trainer.predict_loop.inference_mode  # the default: predict runs under torch.inference_mode()
    results = trainer.predict(SynthesizeInPredict(small_teacher), dataloaders=DataLoader([0, 1], batch_size=1))
    for chunk, (inputs, targets, labels, loss) in enumerate(results):
        reference = synthesize(ZSKDSynthesizer(iterations=10, lr=0.05), small_teacher, chunk=chunk)
        assert torch.equal(inputs, reference[0]) and torch.equal(targets, reference[1]) and loss == reference[3]


def test_fit_callback_writes_what_synthesize_returns(small_teacher, tmp_path):
    """The real path (fit + ImpressionSynthesis, grad enabled by Lightning) gives the plain call's impressions."""
    _, datamodule = tiny.run_synthesis(tmp_path / "cache", num_impressions=16, chunk_size=8, iterations=5,
                                       teacher=tiny.make_net(0))
    cache = datamodule._require_cache()
    for chunk in range(2):
        inputs, targets, labels, _ = synthesize(ZSKDSynthesizer(iterations=5, lr=0.05), small_teacher, chunk=chunk)
        assert np.array_equal(cache.load("inputs", 8 * chunk, 8 * chunk + 8)[0], inputs.numpy())
        assert np.array_equal(cache.load("targets", 8 * chunk, 8 * chunk + 8)[0], targets.numpy())
        assert np.array_equal(cache.load("labels", 8 * chunk, 8 * chunk + 8)[0], labels.numpy())


def test_synthesis_under_bfloat16_autocast_gives_finite_float32(trained_teacher):
    inputs, targets, _, loss = synthesize(
        ZSKDSynthesizer(iterations=10, lr=0.05), trained_teacher,
        autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    )
    assert inputs.dtype == torch.float32 and targets.dtype == torch.float32
    assert torch.isfinite(inputs).all() and np.isfinite(loss)
    x0 = ZSKDSynthesizer().initial_inputs(8, LABELS_ONLY, ChunkRandomness.for_chunk(0, 0).torch)
    assert not torch.equal(inputs, x0)
    in_float32, *_ = synthesize(ZSKDSynthesizer(iterations=10, lr=0.05), trained_teacher)
    assert not torch.equal(inputs, in_float32)  # bf16 ran (the same draws in float32 end elsewhere)


# ---------------------------------------------------------------------------------------------- regularizers
@pytest.fixture(scope="module")
def bn_teacher():
    return as_frozen_teacher(tiny.make_bn_teacher(0))


def bn_penalty(teacher, inputs) -> float:
    reg = BatchNormStatistics()
    with FeatureTaps(teacher.network, reg.taps(teacher.network)) as taps, torch.no_grad():
        logits = teacher(inputs)
        return float(reg(inputs, Response(logits, taps.features)))


def bn_layers(teacher):
    return [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]


def test_batchnorm_statistics_penalty_decreases_and_hooks_are_removed(bn_teacher):
    layers = bn_layers(bn_teacher)
    assert layers and all(len(m._forward_hooks) == len(m._forward_pre_hooks) == 0 for m in layers)
    running = [{k: v.clone() for k, v in m.state_dict().items()} for m in layers]
    synthesizer = ZSKDSynthesizer(iterations=30, lr=0.05, regularizers=[BatchNormStatistics(weight=10.0)])
    x0 = synthesizer.initial_inputs(16, LABELS_ONLY, ChunkRandomness.for_chunk(0, 0).torch)
    inputs = synthesize(synthesizer, bn_teacher, n=16)[0]
    # the running statistics are read, never updated (the teacher stays in eval mode)
    assert all(torch.equal(m.state_dict()[k], v) for m, state in zip(layers, running) for k, v in state.items())
    before, after = bn_penalty(bn_teacher, x0), bn_penalty(bn_teacher, inputs)
    assert before > 0 and after >= 0
    assert after < 0.8 * before, (before, after)
    assert all(len(m._forward_hooks) == len(m._forward_pre_hooks) == 0 for m in layers)
    assert not bn_teacher.training


def test_batchnorm_statistics_hooks_are_removed_when_synthesis_fails(bn_teacher):
    def explode(iteration, loss):
        raise KeyboardInterrupt

    synthesizer = ZSKDSynthesizer(iterations=30, regularizers=[BatchNormStatistics()])
    with pytest.raises(KeyboardInterrupt):
        synthesize(synthesizer, bn_teacher, progress=explode)
    assert all(len(m._forward_hooks) == len(m._forward_pre_hooks) == 0 for m in bn_layers(bn_teacher))


def test_batchnorm_statistics_needs_batchnorm(small_teacher):
    with pytest.raises(ValueError, match="BatchNorm"):
        BatchNormStatistics().taps(small_teacher.network)
    with pytest.raises(ValueError, match="BatchNorm"):
        synthesize(ZSKDSynthesizer(iterations=2, regularizers=[BatchNormStatistics()]), small_teacher)


def test_batchnorm_statistics_needs_running_statistics():
    """A BatchNorm layer built with ``track_running_stats=False`` has nothing to match: one line naming it."""
    network = tiny.make_bn_teacher(0)
    name, layer = next((n, m) for n, m in network.named_modules() if isinstance(m, torch.nn.BatchNorm2d))
    layer.running_mean = layer.running_var = None
    with pytest.raises(ValueError, match=rf"^BatchNormStatistics needs running statistics.*'{name}'") as error:
        BatchNormStatistics().taps(network)
    assert "\n" not in str(error.value)


def test_total_variation():
    regularizer = TotalVariation(weight=1.0)

    def tv(inputs):
        return regularizer(inputs, Response(torch.zeros(len(inputs), K)))

    constant = torch.full((3, 1, 8, 8), 0.7)
    assert torch.equal(tv(constant), torch.zeros(3))
    noisy = constant + torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert tv(noisy).shape == (3,) and (tv(noisy) > 0).all()
    stripes = torch.zeros(1, 1, 8, 8)
    stripes[..., ::2] = 1.0  # vertical stripes: only horizontal differences, each of size 1
    assert tv(stripes).item() == pytest.approx(1.0)


@pytest.mark.parametrize(("shape", "message"), [
    ((4,), r"normalize images of shape \(C, H, W\); the input shape is \(4,\): for inputs that are not images "
           r"give neither"),
    ((2, 8, 8), r"need one value per channel: 2 channels, got 1 and 1"),
])
def test_an_input_spec_that_cannot_hold_its_normalization_is_one_line(shape, message):
    with pytest.raises(InvalidArgument, match=message):
        InputSpec(shape, mean=[0.5], std=[0.25])


def test_normal_init_draws_pixels_from_a_clamped_standard_normal():
    low, high = torch.tensor([-1.0]).view(1, 1, 1), torch.tensor([3.0]).view(1, 1, 1)
    spec = InputSpec((1, 8, 8), mean=[0.25], std=[0.25])  # black at -1, white at 3
    assert torch.equal(spec.valid_range()[0], low) and torch.equal(spec.valid_range()[1], high)
    context = SynthesisContext(teacher=None, input_spec=spec, num_classes=K)
    x0 = ZSKDSynthesizer(init="normal").initial_inputs(4000, context, torch.Generator().manual_seed(0))
    pixels = (x0 - low) / (high - low)
    assert (pixels == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)  # P(z <= 0)
    assert (pixels == 1).float().mean().item() == pytest.approx(0.1587, abs=0.01)  # P(z >= 1)


def test_gray_init_is_low_contrast_noise_around_mid_gray():
    spec = InputSpec((1, 8, 8), mean=[0.25], std=[0.25])
    context = SynthesisContext(teacher=None, input_spec=spec, num_classes=K)
    x0 = ZSKDSynthesizer(init="gray").initial_inputs(4000, context, torch.Generator().manual_seed(0))
    pixels = x0 * 0.25 + 0.25
    assert pixels.mean().item() == pytest.approx(0.5, abs=0.005)
    assert pixels.std().item() == pytest.approx(0.1, abs=0.005)
    with pytest.raises(InvalidArgument, match="init must be one of"):
        ZSKDSynthesizer(init="grey")


def test_pixel_l2_prior_measures_pixels_through_the_input_range():
    prior = PixelL2Prior(weight=1.0)
    black, white = torch.full((1, 1, 4, 4), -0.5), torch.full((1, 1, 4, 4), 1.5)
    response = Response(torch.zeros(1, K))
    spec = InputSpec((1, 4, 4), mean=[0.25], std=[0.5])  # black at -0.5, white at 1.5
    with pytest.raises(InvalidArgument, match="^PixelL2Prior reads the input range at setup"):
        prior(black, response)  # not set up: normalized inputs would pass for pixels
    prior.setup(SynthesisContext(teacher=None, input_spec=spec, num_classes=K), ChunkRandomness.for_setup(0))
    assert prior(black, response).tolist() == [0.0] and prior(white, response).tolist() == [16.0]  # 16 pixels
    prior.setup(SynthesisContext(teacher=None, input_spec=InputSpec((1, 4, 4)), num_classes=K),
                ChunkRandomness.for_setup(0))
    assert prior(white, response).tolist() == [1.5**2 * 16]


def test_pixel_l2_prior_darkens_impressions(small_teacher):
    low, high = RANGE
    plain = synthesize(ZSKDSynthesizer(iterations=30, lr=0.1), small_teacher)[0]
    dark = synthesize(ZSKDSynthesizer(iterations=30, lr=0.1, regularizers=[PixelL2Prior(0.5)]), small_teacher)[0]
    assert ((dark - low) / (high - low)).mean() < ((plain - low) / (high - low)).mean() - 0.1


def test_l2_prior_and_regularizers_compose(small_teacher):
    assert torch.equal(L2Prior()(torch.zeros(2, 1, 8, 8), Response(torch.zeros(2, K))), torch.zeros(2))
    plain = synthesize(ZSKDSynthesizer(iterations=10, lr=0.05), small_teacher)[0]
    smooth = synthesize(ZSKDSynthesizer(iterations=10, lr=0.05, regularizers=[TotalVariation(50.0), L2Prior(1.0)]),
                        small_teacher)[0]
    response = Response(torch.zeros(len(plain), K))
    assert TotalVariation()(smooth, response).mean() < TotalVariation()(plain, response).mean()


def test_channels_last_gives_the_same_impressions_and_restores_the_teacher():
    """A plain module as teacher: ``channels_last`` converts its weights for the synthesis only (a hook sees the
    layout each forward ran in) and puts them back; the impressions match the contiguous run's up to rounding. A
    ``FrozenTeacher(channels_last=False)`` keeps its layout even so."""
    from zskd_lightning.models import LeNet5
    from zskd_lightning.teacher import FrozenTeacher

    torch.manual_seed(0)
    teacher = LeNet5().eval()
    conv = [m for m in teacher.modules() if isinstance(m, nn.Conv2d)][-1]  # 6 input channels: layouts differ
    seen = []
    conv.register_forward_pre_hook(lambda module, args: seen.append(
        module.weight.is_contiguous(memory_format=torch.channels_last) and not module.weight.is_contiguous()))
    results = []
    for channels_last in (False, True):
        seen.clear()
        synthesizer = ZSKDSynthesizer(iterations=5, lr=0.05, channels_last=channels_last)
        results.append(synthesize(synthesizer, teacher, n=16, shape=(1, 32, 32)))
        assert seen and all(s == channels_last for s in seen)  # every forward in the layout asked for
        assert all(p.is_contiguous() for p in teacher.parameters())  # and the teacher's own put back
    assert results[1][0].is_contiguous()
    assert torch.allclose(results[0][0], results[1][0], atol=1e-4)
    assert torch.equal(results[0][1], results[1][1])
    seen.clear()
    kept = FrozenTeacher(network=teacher, channels_last=False)  # e.g. a network that .view()s its conv features
    synthesize(ZSKDSynthesizer(iterations=2, lr=0.05, channels_last=True), kept, n=4, shape=(1, 32, 32))
    assert seen and not any(seen)


def test_plateau_stopping_spends_fewer_steps():
    teacher = _plateau_teacher()
    full = ZSKDSynthesizer(iterations=200, lr=0.1, channels_last=False)
    early = ZSKDSynthesizer(iterations=200, lr=0.1, channels_last=False, stop_tolerance=1e-3, stop_window=20)
    outputs = []
    for synthesizer in (full, early):
        # (inputs without a range are not clamped, so the teacher below saturates and losses plateau)
        context = SynthesisContext(teacher=teacher, input_spec=InputSpec((4,)), num_classes=3, seed=1)
        synthesizer.setup(context)
        outputs.append(synthesizer.invert(context, Chunk.of(1, 0, 0, 32)))
    assert outputs[0].steps == 32 * 200
    assert outputs[1].steps < outputs[0].steps
    assert outputs[1].loss.mean() <= outputs[0].loss.mean() + 0.05  # stopped impressions had already converged


def _plateau_teacher():
    from zskd_lightning.teacher import FrozenTeacher

    torch.manual_seed(0)
    return FrozenTeacher(network=torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)))


def test_synthesis_follows_the_trainers_mixed_precision(tmp_path):
    """Under Trainer(precision="bf16-mixed") the teacher's forward pass in synthesis runs in bf16 autocast,
    while the cached impressions stay float32 and finite. (Lightning turns 16-mixed into bf16-mixed on CPU: the
    float16 path, with its loss scale, is tested on the synthesizers directly.)"""
    teacher = tiny.make_net(0)
    seen: list[torch.dtype] = []
    first_linear = next(m for m in teacher.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    first_linear.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    trainer, datamodule = tiny.run_synthesis(tmp_path / "cache", teacher=teacher, precision="bf16-mixed", grid=False)
    assert torch.bfloat16 in seen
    cache = datamodule._require_cache()
    inputs = np.concatenate(cache.load("inputs"))
    assert inputs.dtype == np.float32 and np.isfinite(inputs).all()
    assert cache.is_complete()


@pytest.mark.parametrize(("synthesis_precision", "trainer_precision", "expected"), [
    ("bf16-mixed", "32-true", torch.bfloat16),  # bf16 for synthesis only
    ("32-true", "bf16-mixed", torch.float32),  # full precision for synthesis whatever the Trainer uses
])
def test_synthesizer_precision_overrides_the_trainers(tmp_path, synthesis_precision, trainer_precision, expected):
    teacher = tiny.make_net(0)
    seen: list[torch.dtype] = []
    first_layer = next(m for m in teacher.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    first_layer.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    synthesizer = ZSKDSynthesizer(iterations=5, lr=0.05, precision=synthesis_precision)
    _, datamodule = tiny.run_synthesis(tmp_path / "cache", teacher=teacher, precision=trainer_precision, grid=False,
                                       synthesizer=synthesizer)
    synthesis_forwards = seen[-8 * 5:]  # 8 chunks x 5 iterations (earlier: the datamodule's shape check)
    assert len(seen) >= 40 and set(synthesis_forwards) == {expected}
    inputs = np.concatenate(datamodule._require_cache().load("inputs"))
    assert inputs.dtype == np.float32 and np.isfinite(inputs).all()


def test_synthesis_precision_is_checked():
    with pytest.raises(ValueError, match="precision must be one of"):
        ZSKDSynthesizer(precision="16-mixed")


def test_bf16_synthesis_reaches_the_targets_like_float32(trained_teacher):
    """bf16 autocast changes the rounding, not the optimization: both reach a similar final loss."""
    _, _, _, loss32 = synthesize(ZSKDSynthesizer(iterations=40, lr=0.05, precision="32-true"), trained_teacher, n=32)
    _, _, _, loss16 = synthesize(ZSKDSynthesizer(iterations=40, lr=0.05, precision="bf16-mixed"), trained_teacher, n=32)
    _, _, _, loss0 = synthesize(ZSKDSynthesizer(iterations=1, lr=0.05, precision="32-true"), trained_teacher, n=32)
    assert loss16 < loss0 and loss32 < loss0
    assert abs(loss16 - loss32) < 0.1 * (loss0 - loss32)


def test_float16_synthesis_scales_its_loss_and_reaches_the_targets_like_float32(trained_teacher, monkeypatch):
    """Under float16 autocast (a Trainer's 16-mixed) the inversion scales its loss (synthesis.LossScale) and
    reaches the float32 run's loss (tests/test_loss_scale.py shows what an unscaled float16 backward loses)."""
    from zskd_lightning.synthesis import LossScale

    made = []
    make = LossScale.for_autocast.__func__
    monkeypatch.setattr(LossScale, "for_autocast", classmethod(lambda cls, *a: made.append(make(cls, *a)) or made[-1]))
    _, _, _, loss32 = synthesize(ZSKDSynthesizer(iterations=40, lr=0.05), trained_teacher, n=32)
    inputs, _, _, loss16 = synthesize(ZSKDSynthesizer(iterations=40, lr=0.05), trained_teacher, n=32,
                                      autocast=lambda: torch.autocast("cpu", dtype=torch.float16))
    _, _, _, loss0 = synthesize(ZSKDSynthesizer(iterations=1, lr=0.05), trained_teacher, n=32)
    assert [m.enabled for m in made] == [False, True, False]
    assert torch.isfinite(inputs).all() and loss16 < loss0
    assert abs(loss16 - loss32) < 0.1 * (loss0 - loss32)


class _RecordingTeacher(nn.Module):
    """Passes inputs to ``network`` and keeps a copy of each batch it was shown."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.network(x)


@pytest.mark.parametrize("chunk", [0, 1, 2])
def test_jitter_shows_the_teacher_the_chunk_rolled_by_a_seeded_offset(small_teacher, chunk):
    """The teacher sees the inputs rolled by (dy, dx) drawn from the chunk's stream right after the initial noise."""
    n, jitter = 8, 2
    synthesizer = ZSKDSynthesizer(iterations=1, lr=0.05, init="normal", jitter=jitter)
    teacher = _RecordingTeacher(small_teacher)
    synthesize(synthesizer, teacher, n=n, chunk=chunk)
    generator = ChunkRandomness.for_chunk(0, chunk).torch
    x0 = synthesizer.initial_inputs(n, LABELS_ONLY, generator)
    dy, dx = torch.randint(-jitter, jitter + 1, (2,), generator=generator).tolist()
    assert len(teacher.seen) == 1
    torch.testing.assert_close(teacher.seen[0], torch.roll(x0, shifts=(dy, dx), dims=(-2, -1)))


def test_jitter_still_reaches_the_targets(trained_teacher):
    """The gradient flows back through the roll to the unshifted inputs: the teacher's loss on them falls."""
    synthesizer = ZSKDSynthesizer(iterations=40, lr=0.05, jitter=1)
    inputs, targets, _, _ = synthesize(synthesizer, trained_teacher, n=32)
    x0 = synthesizer.initial_inputs(32, LABELS_ONLY, ChunkRandomness.for_chunk(0, 0).torch)
    assert teacher_loss(synthesizer, trained_teacher, inputs, targets) < teacher_loss(synthesizer, trained_teacher, x0, targets)


def test_jitter_is_checked():
    with pytest.raises(ValueError, match="jitter must be >= 0"):
        ZSKDSynthesizer(jitter=-1)


def test_jitter_refuses_inputs_that_are_not_images():
    teacher = as_frozen_teacher(nn.Linear(5, K))
    with pytest.raises(ValueError, match=r"jitter shifts images \[C, H, W\].*\(5,\)"):
        context = SynthesisContext(teacher=teacher, input_spec=InputSpec((5,)), num_classes=K)
        ZSKDSynthesizer(iterations=1, jitter=1).invert(context, Chunk.of(0, 0, 0, 4))


def test_a_32_true_synthesizer_runs_in_float32_under_an_enclosing_autocast():
    """``precision: "32-true"`` is float32 whatever autocast a caller holds (a no-op context would not turn
    a bf16 one off); ``"bf16-mixed"`` is bf16, ``None`` the context's own (here none)."""
    context = SynthesisContext(teacher=None, input_spec=InputSpec((1, 4, 4)), num_classes=K)
    ones = torch.ones(2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with context.autocast_for("32-true")():
            assert (ones @ ones).dtype == torch.float32
    with context.autocast_for("bf16-mixed")():
        assert (ones @ ones).dtype == torch.bfloat16
    with context.autocast_for(None)():
        assert (ones @ ones).dtype == torch.float32


def test_total_variation_refuses_inputs_that_are_not_images_in_one_line():
    """Inputs ``[N, 8]``: the vertical differences would run across impressions; refused at setup."""
    teacher = as_frozen_teacher(nn.Sequential(nn.Linear(8, K)))
    synthesizer = ZSKDSynthesizer(regularizers=[TotalVariation()], iterations=2)
    with pytest.raises(InvalidArgument, match=r"^TotalVariation needs image inputs \(\[C, H, W\] or \[H, W\], H and W "
                                              r">= 2\), got input shape \[8\]$"):
        synthesizer.setup(context_for(teacher, normalized=False, shape=(8,)))
    with pytest.raises(InvalidArgument, match=r"got input shape \[1, 1, 8\]$"):  # one row: no vertical neighbours
        TotalVariation().setup(context_for(teacher, normalized=False, shape=(1, 1, 8)), None)
