"""The faster synthesis kernels equal the stock layers they replace (values and input gradients)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny
from helpers.tiny import one_torch_thread  # noqa: F401  (module-wide autouse fixture)
from torch import nn

from zskd_lightning import ZSKDSynthesizer
from zskd_lightning.pixels import InputSpec
from zskd_lightning.synthesis import Chunk, SynthesisContext
from zskd_lightning.synthesis.kernels import BandLocalResponseNorm, fast_synthesis_kernels


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


class LRNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.LocalResponseNorm(5, alpha=0.1))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 8 * 8, 10))

    def forward(self, x):
        return self.head(self.features(x))


def test_swap_is_undone_even_on_error():
    net = LRNNet()
    original = net.features[2]
    with pytest.raises(RuntimeError, match="boom"):
        with fast_synthesis_kernels(net):
            assert isinstance(net.features[2], BandLocalResponseNorm)
            raise RuntimeError("boom")
    assert net.features[2] is original
    with fast_synthesis_kernels(net, enabled=False):
        assert net.features[2] is original


@pytest.mark.parametrize("channels_last", [False, True])
def test_impressions_with_fast_kernels_equal_stock_ones_up_to_rounding(channels_last):
    torch.manual_seed(0)
    teacher = LRNNet().eval().requires_grad_(False)

    def impressions(fast: bool) -> torch.Tensor:
        synthesizer = ZSKDSynthesizer(iterations=30, lr=0.05, fast_kernels=fast, channels_last=channels_last)
        context = SynthesisContext(teacher=teacher, input_spec=InputSpec((1, 8, 8), tiny.DIGITS_MEAN, tiny.DIGITS_STD),
                                   num_classes=10)
        synthesizer.setup(context)
        return synthesizer.invert(context, Chunk.of(0, 0, 0, 16)).inputs

    torch.testing.assert_close(impressions(True), impressions(False), rtol=1e-4, atol=1e-4)
    assert type(teacher.features[2]) is nn.LocalResponseNorm
