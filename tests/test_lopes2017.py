"""Lopes et al. 2017 from recorded metadata: draws reproduce the recorded class statistics; the top-layer and
all-layers objectives pull the teacher's activations toward their draws; the metadata's sha256 is part of the
cache identity; another teacher's metadata is refused in one line."""

from __future__ import annotations

from collections import OrderedDict

import lightning as L
import pytest
import torch
from torch import nn
from helpers import tiny

from zskd_lightning import LopesSynthesizer
from zskd_lightning.data import DigitsDataModule
from zskd_lightning.errors import ZSKDError
from zskd_lightning.metadata import read_metadata
from zskd_lightning.metadata.record import ActivationRecorder
from zskd_lightning.pixels import InputSpec
from zskd_lightning.synthesis.api import Chunk, ChunkRandomness, SynthesisContext
from zskd_lightning.synthesis.api import Response
from zskd_lightning.synthesis.methods.lopes2017 import (
    RecordedActivationTargets,
    SpectralMatching,
    low_frequency_basis,
    matched_layers,
)
from zskd_lightning.taps import FeatureTaps
from zskd_lightning.teacher import as_frozen_teacher


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Metadata of ``make_net(0)`` over the digits training split (logits at T = 8; conv kept as variances)."""
    path = tmp_path_factory.mktemp("lopes") / "meta.safetensors"
    data = DigitsDataModule(batch_size=128)
    data.setup("fit")
    recorder = ActivationRecorder(tiny.make_net(0), output=str(path), max_full_dim=64)
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False).validate(
        recorder, dataloaders=data.train_dataloader())
    return path


def _context(teacher=None) -> SynthesisContext:
    spec = InputSpec(tiny.INPUT_SHAPE, tiny.DIGITS_MEAN, tiny.DIGITS_STD)
    return SynthesisContext(teacher=as_frozen_teacher(teacher or tiny.make_net(0)), input_spec=spec, num_classes=10)


def test_draws_reproduce_the_recorded_class_statistics(recorded):
    sampler = RecordedActivationTargets(str(recorded), "all_layers", layers=["body.4", "logits"])
    sampler.setup(_context(), ChunkRandomness.for_setup(0))
    n = 20_000
    targets, classes = sampler.sample(Chunk.of(0, 0, 0, n), _context())
    record = read_metadata(recorded)
    fc = record.layers["body.4"]  # 32 units, kept full
    assert fc.kept == "full" and targets.shape == (n, 32 + 10)
    rows = targets[classes == 3, :32].double()
    torch.testing.assert_close(rows.mean(0), fc.mean[3], atol=0.05 * float(fc.std[3].max()), rtol=0)
    empirical = torch.cov(rows.T, correction=0)
    scale = float(fc.spread[3].diagonal().max())
    assert float((empirical - fc.spread[3]).abs().max()) < 0.05 * scale


def test_matched_layers_keep_the_files_order_whatever_the_order_given(recorded):
    """The spectral objectives chain the matched layers in this order (each one's weights the edges to the next):
    a list given backwards chained equal-width layers the wrong way round without an error."""
    metadata = read_metadata(recorded)
    in_file = list(metadata.layers)
    hidden = [name for name in in_file if name != "logits"]
    assert len(hidden) >= 2
    assert matched_layers(metadata, "all_layers", list(reversed(in_file))) == in_file
    assert matched_layers(metadata, "spectral_layer_pairs", list(reversed(hidden))) == hidden


def test_layers_given_to_the_top_layer_objective_are_refused_in_one_line(recorded):
    metadata = read_metadata(recorded)
    with pytest.raises(ZSKDError, match=r"^the top_layer objective matches the logits alone; `layers` \['body.5'\]"):
        matched_layers(metadata, "top_layer", ["body.5"])
    with pytest.raises(ZSKDError, match=r"^the top_layer objective matches the logits alone"):
        LopesSynthesizer(str(recorded), objective="top_layer", layers=["body.5"])  # at construction


@pytest.mark.parametrize("objective, layers, message", [
    ("all_layers", [], r"^layers must name each matched layer once .*got \[\]"),
    ("all_layers", ["body.5", "body.5"], r"^layers must name each matched layer once .*got \['body.5', 'body.5'\]"),
    ("spectral_all_layers", ["body.5", "logits"], r"^the spectral objectives match recorded nn.Linear outputs; "
                                                   r"'logits' in layers"),
], ids=["empty", "repeated", "logits in a spectral objective"])
def test_bad_layer_lists_are_refused_in_one_line_at_construction(recorded, objective, layers, message):
    with pytest.raises(ZSKDError, match=message):
        LopesSynthesizer(str(recorded), objective=objective, layers=layers)


@pytest.mark.parametrize("objective", ["top_layer", "all_layers", "spectral_all_layers", "spectral_layer_pairs"])
def test_the_objective_pulls_activations_toward_their_draws(recorded, objective):
    context = _context()
    runs = {}
    for iterations in (1, 40):
        synthesizer = LopesSynthesizer(str(recorded), objective=objective, iterations=iterations, lr=0.05)
        synthesizer.setup(context)
        runs[iterations] = synthesizer.invert(context, Chunk.of(0, 0, 0, 20))
    assert runs[40].loss.mean() < 0.5 * runs[1].loss.mean()
    assert runs[40].targets.shape == (20, 10)  # the cache keeps the drawn logits / T
    assert torch.equal(runs[40].labels, torch.arange(20) % 10)


def test_the_metadata_is_part_of_the_cache_identity(recorded, tmp_path):
    other = tmp_path / "other.safetensors"
    other.write_bytes(recorded.read_bytes()[:-1] + b" ")  # another file (its content differs by one byte)
    first = LopesSynthesizer(str(recorded)).identity()
    assert first["name"] == "lopes2017" and len(first["metadata_sha256"]) == 64
    assert LopesSynthesizer(str(other)).identity()["metadata_sha256"] != first["metadata_sha256"]


def test_another_teachers_metadata_is_refused_in_one_line(recorded):
    synthesizer = LopesSynthesizer(str(recorded))
    with pytest.raises(ZSKDError, match="was recorded from teacher .*, not from this teacher"):
        synthesizer.setup(_context(tiny.make_net(3)))


def test_the_low_frequency_basis_is_orthonormal_and_starts_at_the_null_vector():
    net = tiny.make_net(0)
    basis = low_frequency_basis([net.body[4], net.body[6]], fraction=0.25)
    assert basis.shape == (42, 11)  # ceil(0.25 * (32 + 10))
    torch.testing.assert_close(basis.T @ basis, torch.eye(11, dtype=torch.float64))
    weight = net.body[6].weight.detach().abs().double()  # [10, 32]: the only edges
    degree = torch.cat([weight.sum(0), weight.sum(1)])
    null = degree.sqrt() / degree.sqrt().norm()  # the normalized Laplacian's null vector on a connected graph
    torch.testing.assert_close(basis[:, 0] * torch.sign(basis[0, 0]), null)


def test_spectral_objectives_differ_from_all_layers(recorded):
    context = _context()
    losses = {}
    for objective in ("all_layers", "spectral_all_layers", "spectral_layer_pairs"):
        synthesizer = LopesSynthesizer(str(recorded), objective=objective, iterations=1, lr=0.05)
        synthesizer.setup(context)
        losses[objective] = synthesizer.invert(context, Chunk.of(0, 0, 0, 20)).loss
    ratio = losses["spectral_all_layers"] / losses["all_layers"]
    assert float(ratio.std()) > 1e-3, "not a mere rescaling of the all-layers loss"
    # the tiny teacher has two linear layers: one graph over all of them is its one pair's graph
    torch.testing.assert_close(losses["spectral_all_layers"], losses["spectral_layer_pairs"])


def test_layer_pairs_over_three_linear_layers_sum_two_graphs_at_their_target_columns(tmp_path):
    """Three recorded linear layers: the pairs objective is the (fc1, fc2) graph's loss plus the (fc2, fc3) one's,
    each on its layers' own target columns (fc1 0-16, fc2 16-28, fc3 28-38; the logits / T last)."""
    torch.manual_seed(0)
    net = nn.Sequential(OrderedDict(flat=nn.Flatten(), fc1=nn.Linear(64, 16), relu1=nn.ReLU(), fc2=nn.Linear(16, 12),
                                    relu2=nn.ReLU(), fc3=nn.Linear(12, 10)))
    path = tmp_path / "meta.safetensors"
    data = DigitsDataModule(batch_size=256)
    data.setup("fit")
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False).validate(
        ActivationRecorder(net, output=str(path)), dataloaders=data.train_dataloader())
    context = _context(net)
    x, targets = torch.randn(5, 1, 8, 8), torch.randn(5, 16 + 12 + 10 + 10)
    losses = {}
    for objective in ("spectral_layer_pairs", "spectral_all_layers"):
        matching = SpectralMatching(str(path), objective, fraction=0.5)
        matching.setup(context, ChunkRandomness.for_setup(0))
        with FeatureTaps(net, matching.taps(net)) as taps:
            logits = net(x)
        losses[objective] = matching(Response(logits, taps.features), targets)
    columns = {"fc1": (0, 16), "fc2": (16, 28), "fc3": (28, 38)}
    expected = 0.0
    for pair in (("fc1", "fc2"), ("fc2", "fc3")):
        basis = low_frequency_basis([getattr(net, name) for name in pair], 0.5).float()
        value = torch.cat([taps.features[name] for name in pair], dim=1)  # the activations of x, tapped above
        target = torch.cat([targets[:, slice(*columns[name])] for name in pair], dim=1)
        expected = expected + ((value - target) @ basis).pow(2).mean(1)
    torch.testing.assert_close(losses["spectral_layer_pairs"], expected)
    assert not torch.allclose(losses["spectral_layer_pairs"], losses["spectral_all_layers"])


def test_a_spectral_synthesis_set_up_and_run_inside_inference_mode_keeps_its_gradients(recorded):
    """The basis and the draws' factors made at setup are used with gradients: a caller's inference_mode (a
    predict or test hook) must not make them inference tensors that autograd cannot save."""
    synthesizer = LopesSynthesizer(str(recorded), objective="spectral_all_layers", iterations=2)
    context = _context()
    with torch.inference_mode():
        synthesizer.setup(context)
        inputs = synthesizer.invert(context, Chunk.of(0, 0, 0, 4)).inputs
    assert inputs.shape == (4, *tiny.INPUT_SHAPE) and torch.isfinite(inputs).all()


@pytest.mark.parametrize("layers", [["body.0", "body.4"], ["body.4"]], ids=["a conv layer", "one layer"])
def test_spectral_objectives_need_a_chain_of_linear_layers(recorded, layers):
    with pytest.raises(ZSKDError, match="two or more recorded nn.Linear layers"):
        LopesSynthesizer(str(recorded), objective="spectral_layer_pairs", layers=layers).setup(_context())


def test_metadata_recorded_at_another_input_shape_is_refused_in_one_line(tmp_path):
    """A fully convolutional teacher (adaptive pooling) recorded on 8x8 inputs, synthesized at 12x12: its conv
    layer gives 4 x 12 x 12 values where the metadata holds 4 x 8 x 8, said in one line naming the layer."""
    torch.manual_seed(0)
    network = nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 4, 3, padding=1), act=nn.ReLU(),
                                        pool=nn.AdaptiveAvgPool2d(2), flat=nn.Flatten(), fc=nn.Linear(16, 10)))
    path = tmp_path / "meta.safetensors"
    inputs, labels = torch.randn(200, 1, 8, 8), torch.arange(200) % 10
    recorder = ActivationRecorder(network, output=str(path), layers=["conv"], max_full_dim=8)
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False).validate(
        recorder, dataloaders=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, labels), batch_size=50))
    context = SynthesisContext(teacher=as_frozen_teacher(network), input_spec=InputSpec((1, 12, 12)), num_classes=10)
    synthesizer = LopesSynthesizer(str(path), objective="all_layers", iterations=2)
    synthesizer.setup(context)
    with pytest.raises(ZSKDError, match=r"^.*meta.safetensors: layer 'conv' was recorded with 256 values per input, "
                                        r"the teacher gives \[4, 12, 12\] at this input shape: record the metadata at "
                                        r"the input shape synthesized$"):
        synthesizer.invert(context, Chunk.of(0, 0, 0, 10))
