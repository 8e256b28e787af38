"""Shape, structure and gradient tests for zskd_lightning.models (CPU, fast)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import zskd_lightning.models as models
from zskd_lightning.models import (
    AlexNet,
    AlexNetHalf,
    CIFARResNet,
    DigitsConvNet,
    DigitsConvNetHalf,
    LeNet5,
    LeNet5Half,
    ResNet18,
    ResNet34,
)

ALL_MODELS = [LeNet5, LeNet5Half, AlexNet, AlexNetHalf, ResNet18, ResNet34, DigitsConvNet, DigitsConvNetHalf]
HALF_PAIRS = [(LeNet5, LeNet5Half), (AlexNet, AlexNetHalf), (DigitsConvNet, DigitsConvNetHalf)]


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears, f"{type(model).__name__} has no nn.Linear"
    return linears[-1]


def _batch(cls: type, in_channels: int, batch: int = 2) -> torch.Tensor:
    h, w = cls.input_size
    return torch.randn(batch, in_channels, h, w)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_all_exported():
    for cls in ALL_MODELS + [CIFARResNet]:
        assert cls.__name__ in models.__all__
        assert getattr(models, cls.__name__) is cls


@pytest.mark.parametrize("cls", ALL_MODELS, ids=lambda c: c.__name__)
def test_input_size_attribute(cls):
    size = cls.input_size
    assert isinstance(size, tuple) and len(size) == 2
    assert all(isinstance(s, int) and s > 0 for s in size)


@pytest.mark.parametrize("cls", ALL_MODELS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("num_classes", [10, 100])
def test_output_shape_and_classifier(cls, in_channels, num_classes):
    model = cls(in_channels=in_channels, num_classes=num_classes).eval()
    x = _batch(cls, in_channels)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, num_classes)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert _last_linear(model).out_features == num_classes


@pytest.mark.parametrize("cls", ALL_MODELS, ids=lambda c: c.__name__)
def test_last_linear_produces_the_logits(cls):
    """The last nn.Linear really is the final layer: its output equals the model output."""
    model = cls(in_channels=3, num_classes=7).eval()
    captured = {}
    handle = _last_linear(model).register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    try:
        with torch.no_grad():
            out = model(_batch(cls, 3))
    finally:
        handle.remove()
    torch.testing.assert_close(captured["out"], out)


@pytest.mark.parametrize("full,half", HALF_PAIRS, ids=lambda c: c.__name__)
def test_half_has_fewer_parameters(full, half):
    assert issubclass(half, full)
    assert half.input_size == full.input_size
    for in_channels, num_classes in [(1, 10), (3, 10), (3, 100)]:
        n_full = _n_params(full(in_channels=in_channels, num_classes=num_classes))
        n_half = _n_params(half(in_channels=in_channels, num_classes=num_classes))
        assert n_half < n_full


def test_resnet34_deeper_than_resnet18():
    assert issubclass(ResNet18, CIFARResNet) and issubclass(ResNet34, CIFARResNet)
    assert _n_params(ResNet34()) > _n_params(ResNet18())


def _conv_widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def _linear_widths(model: nn.Module) -> list[int]:
    return [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]


def test_lenet_exact_widths():
    full, half = LeNet5(), LeNet5Half()
    assert _conv_widths(full) == [6, 16]
    assert _linear_widths(full) == [120, 84, 10]
    assert _conv_widths(half) == [3, 8]
    assert _linear_widths(half) == [60, 42, 10]
    # flatten sizes: 16*5*5 and 8*5*5
    assert [m.in_features for m in full.modules() if isinstance(m, nn.Linear)][0] == 16 * 5 * 5
    assert [m.in_features for m in half.modules() if isinstance(m, nn.Linear)][0] == 8 * 5 * 5
    # kernel sizes are 5x5
    assert all(m.kernel_size == (5, 5) for m in full.modules() if isinstance(m, nn.Conv2d))


def test_alexnet_widths_and_dropout():
    full, half = AlexNet(), AlexNetHalf(dropout=0.3)
    assert _conv_widths(full) == [48, 128, 192, 192, 128]
    assert _linear_widths(full) == [512, 256, 10]
    assert _conv_widths(half) == [24, 64, 96, 96, 64]
    assert _linear_widths(half) == [256, 128, 10]
    # 32 -> 15 -> 7 -> 3 after the three 3x3/stride-2 pools
    assert _last_linear_in_features(full, 0) == 128 * 3 * 3
    assert _last_linear_in_features(half, 0) == 64 * 3 * 3
    assert [m.p for m in full.modules() if isinstance(m, nn.Dropout)] == [0.5, 0.5]
    assert [m.p for m in half.modules() if isinstance(m, nn.Dropout)] == [0.3, 0.3]
    assert sum(isinstance(m, nn.LocalResponseNorm) for m in full.modules()) == 2
    assert sum(isinstance(m, nn.BatchNorm2d) for m in full.modules()) == 5
    assert sum(isinstance(m, nn.BatchNorm1d) for m in full.modules()) == 2


def _last_linear_in_features(model: nn.Module, index: int) -> int:
    return [m.in_features for m in model.modules() if isinstance(m, nn.Linear)][index]


def test_digits_widths():
    full, half = DigitsConvNet(), DigitsConvNetHalf()
    assert _conv_widths(full) == [32, 64]
    assert _linear_widths(full) == [128, 10]
    assert _conv_widths(half) == [16, 32]
    assert _linear_widths(half) == [64, 10]
    assert _last_linear_in_features(full, 0) == 64 * 4 * 4
    custom = DigitsConvNet(width=8)
    assert _conv_widths(custom) == [8, 16]
    assert _linear_widths(custom) == [32, 10]


def test_resnet_structure():
    r18, r34 = ResNet18(), ResNet34()
    for model, blocks in [(r18, [2, 2, 2, 2]), (r34, [3, 4, 6, 3])]:
        assert [len(s) for s in (model.layer1, model.layer2, model.layer3, model.layer4)] == blocks
        stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        assert stem.kernel_size == (3, 3) and stem.stride == (1, 1) and stem.out_channels == 64
        assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
        assert _last_linear(model).in_features == 512
    with pytest.raises(ValueError, match=r"^blocks_per_stage needs 4 entries, got \[2, 2, 2\]$"):
        CIFARResNet(blocks_per_stage=(2, 2, 2))


def test_resnet_accepts_other_input_sizes():
    model = ResNet18(in_channels=3, num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)
        assert model(torch.randn(2, 3, 40, 40)).shape == (2, 10)


def _train_batch(cls: type) -> torch.Tensor:
    # batch >= 2 for BatchNorm1d in train mode; ResNets kept at 2 for speed
    return _batch(cls, 3, batch=2 if issubclass(cls, CIFARResNet) else 4)


@pytest.mark.parametrize("cls", ALL_MODELS, ids=lambda c: c.__name__)
def test_gradients_flow_from_sum_of_logits(cls):
    model = cls(in_channels=3, num_classes=10).train()
    model.zero_grad()
    model(_train_batch(cls)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{cls.__name__}.{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{cls.__name__}.{name} has a non-finite gradient"
    # the classifier's gradient is never degenerate
    assert _last_linear(model).weight.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", ALL_MODELS, ids=lambda c: c.__name__)
def test_gradients_nonzero_for_every_parameter(cls):
    """With a real loss every parameter gets a materially non-zero gradient.

    (The plain sum of logits is not used here: in AlexNet the train-mode BatchNorm1d right
    before the classifier makes the batch-sum of the logits independent of everything
    upstream, so those gradients are only float round-off.)
    """
    model = cls(in_channels=3, num_classes=10).train()
    x = _train_batch(cls)
    target = torch.arange(x.shape[0]) % 10
    model.zero_grad()
    nn.functional.cross_entropy(model(x), target).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{cls.__name__}.{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{cls.__name__}.{name} has a non-finite gradient"
        assert p.grad.abs().max() > 1e-4, f"{cls.__name__}.{name} has a (near-)zero gradient"


@pytest.mark.parametrize("cls", ALL_MODELS, ids=lambda c: c.__name__)
def test_constructible_from_yaml_style_kwargs(cls):
    init_args = {"in_channels": 3, "num_classes": 10}
    model = cls(**init_args)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 3
    assert _last_linear(model).out_features == 10
    # the defaults alone are enough too
    default = cls()
    assert _last_linear(default).out_features == 10


def test_default_in_channels():
    for cls in (LeNet5, LeNet5Half, DigitsConvNet, DigitsConvNetHalf):
        first = next(m for m in cls().modules() if isinstance(m, nn.Conv2d))
        assert first.in_channels == 1, cls.__name__
    for cls in (AlexNet, AlexNetHalf, ResNet18, ResNet34):
        first = next(m for m in cls().modules() if isinstance(m, nn.Conv2d))
        assert first.in_channels == 3, cls.__name__


def test_wrong_input_size_fails_for_fixed_size_models():
    """Fixed-flatten models reject a wrong spatial size (other code turns this into a clear error)."""
    for cls in (LeNet5, AlexNet, DigitsConvNet):
        model = cls(in_channels=3).eval()
        h, w = cls.input_size
        with pytest.raises(RuntimeError), torch.no_grad():
            model(torch.randn(2, 3, h * 2, w * 2))


@pytest.mark.parametrize("shape", [(4, 6, 28, 28), (4, 16, 10, 10), (2, 3, 7, 9)])
def test_maxpool2x2_matches_max_pool2d_with_and_without_autograd(shape):
    from zskd_lightning.models.lenet import MaxPool2x2

    x = torch.randn(*shape)
    x[0, 0, 0, 0] = float("nan")  # NaNs propagate as in max_pool2d
    reference = nn.functional.max_pool2d(x, 2)
    with torch.no_grad():  # the strided-maximum path (even sizes) or max_pool2d (odd)
        assert torch.equal(MaxPool2x2()(x).nan_to_num(7.0), reference.nan_to_num(7.0))
    leaf = x.nan_to_num(0.0).requires_grad_(True)
    pooled = MaxPool2x2()(leaf)
    pooled.sum().backward()
    expected = leaf.detach().clone().requires_grad_(True)
    nn.functional.max_pool2d(expected, 2).sum().backward()
    assert torch.equal(pooled.detach(), nn.functional.max_pool2d(leaf.detach(), 2))
    assert torch.equal(leaf.grad, expected.grad)
