"""The faster teacher kernels equal the stock layers they replace (values and input gradients), in synthesis and in
the frozen teacher's forward."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny
from helpers.tiny import one_torch_thread  # noqa: F401  (module-wide autouse fixture)
from torch import nn

from zskd_lightning import DistillationModule, FrozenTeacher, ZSKDError, ZSKDSynthesizer
from zskd_lightning.kernels import BandLocalResponseNorm, default_layout, fast_kernels_in, in_channels_last
from zskd_lightning.pixels import InputSpec
from zskd_lightning.synthesis import Chunk, SynthesisContext


@pytest.mark.parametrize("size,channels", [(5, 12), (4, 7), (3, 2), (5, 3)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_band_lrn_matches_stock_values_and_input_gradients(size, channels, channels_last):
    torch.manual_seed(0)
    stock = nn.LocalResponseNorm(size, alpha=0.3, beta=0.75, k=2.0)  # a large alpha makes the window matter
    band = BandLocalResponseNorm.like(stock)
    x = 3 * torch.randn(4, channels, 6, 5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x_stock, x_band = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    upstream = torch.randn(4, channels, 6, 5)
    y_stock, y_band = stock(x_stock), band(x_band)
    (y_stock * upstream).sum().backward()
    (y_band * upstream).sum().backward()
    torch.testing.assert_close(y_band, y_stock, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_band.grad, x_stock.grad, rtol=1e-5, atol=1e-6)


def test_band_lrn_in_float16_overflows_only_where_the_stock_layer_would():
    """Five neighbouring channels at 150: each square (22,500) fits in float16, their sum (112,500) does not; the
    band averages, as the stock layer does, so the output stays finite and equal to float32's."""
    x = torch.full((1, 5, 2, 2), 150.0)
    stock = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)
    y = BandLocalResponseNorm.like(stock)(x.half())
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), stock(x), rtol=2e-3, atol=0.0)


def test_band_lrn_keeps_a_float32_input_in_float32_under_autocast():
    """Autocast would run the band's ``conv2d`` in bfloat16 (the stock layer's pooling stays float32): the window
    mean would carry bfloat16's 4e-3 rounding into a float32 output."""
    torch.manual_seed(0)
    stock = nn.LocalResponseNorm(5, alpha=0.3, beta=0.75, k=2.0)
    x = 3 * torch.randn(2, 8, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_band, y_stock = BandLocalResponseNorm.like(stock)(x), stock(x)
    assert y_band.dtype == y_stock.dtype == torch.float32
    torch.testing.assert_close(y_band, y_stock, rtol=1e-5, atol=1e-6)


def test_band_lrn_of_a_bfloat16_input_under_autocast_stays_bfloat16_within_its_rounding_of_the_stock_layer():
    """Inside an autocast network a convolution hands the layer bfloat16; the stock layer returns float32 there.
    The band keeps bfloat16 (for speed, see its docstring): equal to the stock layer's output to bfloat16's
    rounding, with AlexNet's constants and with a large alpha that makes the window matter."""
    torch.manual_seed(0)
    x = (3 * torch.randn(2, 8, 4, 4)).bfloat16()
    for alpha in (1e-4, 0.3):
        stock = nn.LocalResponseNorm(5, alpha=alpha, beta=0.75, k=2.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_band, y_stock = BandLocalResponseNorm.like(stock)(x), stock(x)
        assert y_band.dtype == torch.bfloat16 and y_stock.dtype == torch.float32
        torch.testing.assert_close(y_band.float(), y_stock, rtol=1.6e-2, atol=1e-3)


def test_a_band_first_built_in_inference_mode_still_takes_gradients():
    """A validation step (Lightning's inference mode) may be the first to run the layer; synthesis after it
    needs input gradients through the same cached band."""
    band = BandLocalResponseNorm.like(nn.LocalResponseNorm(3))
    with torch.inference_mode():
        band(torch.randn(2, 4, 3, 3))
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    band(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


class LRNNet(nn.Module):
    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, 6, 3, padding=1), nn.ReLU(),
                                      nn.LocalResponseNorm(5, alpha=0.1))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 8 * 8, 10))

    def forward(self, x):
        return self.head(self.features(x))


def test_swap_is_undone_even_on_error():
    net = LRNNet()
    original = net.features[2]
    with pytest.raises(RuntimeError, match="boom"):
        with fast_kernels_in(net):
            assert isinstance(net.features[2], BandLocalResponseNorm)
            raise RuntimeError("boom")
    assert net.features[2] is original
    with fast_kernels_in(net, enabled=False):
        assert net.features[2] is original


@pytest.mark.parametrize("channels_last", [False, True])
def test_impressions_with_fast_kernels_equal_stock_ones_up_to_rounding(channels_last):
    torch.manual_seed(0)
    teacher = LRNNet().eval().requires_grad_(False)

    ran = []  # the LRN class each teacher forward met: the fast run must take the banded kernel
    teacher.features.register_forward_pre_hook(lambda module, args: ran.append(type(module[2])))

    def impressions(fast: bool) -> torch.Tensor:
        synthesizer = ZSKDSynthesizer(iterations=30, lr=0.05, fast_kernels=fast, channels_last=channels_last)
        context = SynthesisContext(teacher=teacher, input_spec=InputSpec((1, 8, 8), tiny.DIGITS_MEAN, tiny.DIGITS_STD),
                                   num_classes=10)
        synthesizer.setup(context)
        ran.clear()
        inputs = synthesizer.invert(context, Chunk.of(0, 0, 0, 16)).inputs
        assert set(ran) == {BandLocalResponseNorm if fast else nn.LocalResponseNorm}
        return inputs

    torch.testing.assert_close(impressions(True), impressions(False), rtol=1e-4, atol=1e-4)
    assert type(teacher.features[2]) is nn.LocalResponseNorm


def lrn_teacher(**options) -> FrozenTeacher:
    torch.manual_seed(0)
    return FrozenTeacher(network=LRNNet(in_channels=3), **options)


def test_frozen_teacher_runs_banded_lrn_on_channels_last_with_the_stock_logits():
    fast, stock = lrn_teacher(), lrn_teacher(fast_kernels=False, channels_last=False)
    assert isinstance(fast.network.features[2], BandLocalResponseNorm) and in_channels_last(fast.network)
    assert type(stock.network.features[2]) is nn.LocalResponseNorm and not in_channels_last(stock.network)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), stock(x), rtol=1e-5, atol=1e-6)
    assert fast.fingerprint() == stock.fingerprint()  # same teacher: the caches and checkpoints of either fit both


def test_distillation_runs_the_teacher_fast_and_leaves_the_student_alone():
    module = DistillationModule(teacher=LRNNet(in_channels=3), student=LRNNet(in_channels=3))
    assert isinstance(module.teacher.network.features[2], BandLocalResponseNorm)
    assert in_channels_last(module.teacher.network)
    assert type(module.student.features[2]) is nn.LocalResponseNorm and not in_channels_last(module.student)


@pytest.mark.parametrize("options,layout_after", [({}, True), ({"channels_last": False}, False)])
def test_synthesis_leaves_the_teachers_layout_as_it_found_it(options, layout_after):
    teacher = lrn_teacher(**options)
    synthesizer = ZSKDSynthesizer(iterations=3, lr=0.05)  # channels_last during synthesis (the default)
    context = SynthesisContext(teacher=teacher, input_spec=InputSpec((3, 8, 8), (0.5,) * 3, (0.25,) * 3),
                               num_classes=10)
    synthesizer.setup(context)
    impressions = synthesizer.invert(context, Chunk.of(0, 0, 0, 4)).inputs
    assert impressions.shape == (4, 3, 8, 8) and torch.isfinite(impressions).all()
    assert in_channels_last(teacher.network) is layout_after


def test_a_teacher_that_views_channels_last_features_is_told_how_to_fix_it_in_one_line():
    x = torch.randn(2, 3, 8, 8)
    fix = r"^teacher ViewNet calls \.view on a channels-last tensor: .*channels_last: false"
    with pytest.raises(ZSKDError, match=fix) as err:
        FrozenTeacher(network=tiny.ViewNet(in_channels=3))(x)
    assert "\n" not in str(err.value)
    assert FrozenTeacher(network=tiny.ViewNet(in_channels=3), channels_last=False)(x).shape == (2, 10)
    # channels-last inputs too (an online generator's outputs): the fix holds whatever layout the inputs have
    nhwc = x.contiguous(memory_format=torch.channels_last)
    assert FrozenTeacher(network=tiny.ViewNet(in_channels=3), channels_last=False)(nhwc).shape == (2, 10)
    # one channel (an MNIST generator's outputs): channels-last strides that .contiguous() takes as row-major
    one_channel = torch.randn(2, 1, 8, 8).to(memory_format=torch.channels_last)
    assert one_channel.is_contiguous() and one_channel.stride() == (64, 1, 8, 1)
    assert FrozenTeacher(network=tiny.ViewNet(in_channels=1), channels_last=False)(one_channel).shape == (2, 10)


@pytest.mark.parametrize("shape, layout", [((2, 3, 4, 4), "rows"), ((2, 3, 4, 4), "nhwc"), ((2, 1, 4, 4), "nhwc"),
                                           ((2, 3, 4, 8), "slice")])
def test_default_layout_gives_row_major_strides_and_the_same_values(shape, layout):
    x = torch.randn(shape)
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "slice":
        x = x[..., ::2]
    standard = default_layout(x)
    _, c, h, w = standard.shape
    assert standard.stride() == (c * h * w, h * w, w, 1) and torch.equal(standard, x)
    assert (standard is x) == (layout == "rows")  # no copy where none is needed


def test_synthesis_keeps_a_teacher_told_not_to_run_channels_last():
    """The fix the message above gives holds in synthesis too (whose own default is channels-last)."""
    teacher = FrozenTeacher(network=tiny.ViewNet(in_channels=3), channels_last=False)
    context = SynthesisContext(teacher=teacher, input_spec=InputSpec((3, 8, 8), (0.5,) * 3, (0.25,) * 3),
                               num_classes=10)
    synthesizer = ZSKDSynthesizer(iterations=2)
    synthesizer.setup(context)
    impressions = synthesizer.invert(context, Chunk.of(0, 0, 0, 4)).inputs
    assert impressions.shape == (4, 3, 8, 8) and torch.isfinite(impressions).all()
