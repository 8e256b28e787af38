"""BatchAugmentation: vectorised per-sample random augmentation of pixel-space batches."""

from __future__ import annotations

import pytest
import torch

from zskd_lightning.augment import BatchAugmentation, augment_normalized, shift_and_flip
from zskd_lightning.errors import InvalidArgument


def test_identity_parameters_leave_the_batch_unchanged():
    """Through the geometric path too: an identity affine grid samples every pixel where it was."""
    x = torch.rand(8, 3, 16, 12)
    assert torch.allclose(BatchAugmentation()(x), x, atol=1e-5)
    assert torch.allclose(BatchAugmentation()._move(x), x, atol=1e-5)
    assert not torch.allclose(BatchAugmentation(degrees=30)._move(x), x, atol=1e-2)  # which can tell a move


def test_each_sample_gets_its_own_transform():
    torch.manual_seed(0)
    x = torch.rand(1, 1, 16, 16).expand(16, 1, 16, 16).contiguous()  # 16 copies of one image
    out = BatchAugmentation(degrees=30, translate=(0.2, 0.2), scale=(0.8, 1.2))(x)
    assert out.shape == x.shape
    distinct = {tuple(o.flatten().round(decimals=4).tolist()) for o in out}
    assert len(distinct) == 16


def test_fill_and_range():
    torch.manual_seed(0)
    white = torch.ones(32, 1, 8, 8)
    out = BatchAugmentation(translate=(0.25, 0.25), fill=0.0)(white)
    assert out.min() >= -1e-6 and out.max() <= 1 + 1e-6
    assert torch.isclose(out.amin(), torch.tensor(0.0), atol=1e-6)  # black comes in from outside
    noisy = BatchAugmentation(noise_std=0.5)(torch.full((4, 1, 8, 8), 0.5))
    assert noisy.min() >= 0 and noisy.max() <= 1 and noisy.std() > 0.1


def test_hflip_flips_about_half():
    torch.manual_seed(0)
    ramp = torch.linspace(0, 1, 8).view(1, 1, 1, 8).expand(200, 1, 8, 8).contiguous()
    out = BatchAugmentation(hflip=True)(ramp)
    flipped = (out[..., 0] > out[..., -1]).flatten(1).all(1)
    assert 60 < int(flipped.sum()) < 140
    assert torch.allclose(out[flipped], ramp[flipped].flip(-1), atol=1e-5)


def test_augment_normalized_maps_through_pixel_space():
    low, high = torch.tensor([-1.0]).view(1, 1, 1), torch.tensor([3.0]).view(1, 1, 1)
    x = low + (high - low) * torch.rand(4, 1, 8, 8)
    assert torch.allclose(augment_normalized(x, BatchAugmentation(), (low, high)), x, atol=1e-5)
    shifted = augment_normalized(torch.full_like(x, 3.0), BatchAugmentation(translate=(0.3, 0.3)), (low, high))
    assert shifted.min() >= -1 - 1e-5 and shifted.max() <= 3 + 1e-5


def test_mix_blends_each_image_with_another_of_its_batch():
    torch.manual_seed(0)
    black, white = torch.zeros(32, 1, 4, 4), torch.ones(32, 1, 4, 4)
    out = BatchAugmentation(mix=0.5)(torch.cat([black, white]))
    assert out.shape == (64, 1, 4, 4)
    assert (out >= 0).all() and (out <= 1).all()
    flat = out.flatten(1)
    assert torch.allclose(flat, flat[:, :1].expand_as(flat))  # a blend of two constant images is constant
    values = flat[:, 0]
    assert (values[:32] <= 0.5 + 1e-6).all() and (values[32:] >= 0.5 - 1e-6).all()  # the partner weighs <= 0.5
    assert ((values > 0.01) & (values < 0.99)).any()  # some black/white pairs were actually blended


def test_without_geometry_or_mix_or_noise_the_batch_is_unchanged():
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(BatchAugmentation()(x), x)


@pytest.mark.parametrize("settings, message", [
    ({"degrees": -5}, "degrees must be >= 0, got -5"),
    ({"translate": (0.1, 1.5)}, "translate must be two fractions in [0, 1], got [0.1, 1.5]"),
    ({"scale": (1.2, 0.8)}, "scale must be (min, max), 0 < min <= max, got [1.2, 0.8]"),
    ({"noise_std": -0.1}, "noise_std must be >= 0, got -0.1"),
    ({"fill": 255}, "fill must be a pixel value in [0, 1], got 255"),
])
def test_settings_that_would_silently_do_something_else_are_refused(settings, message):
    with pytest.raises(InvalidArgument) as caught:
        BatchAugmentation(**settings)
    assert str(caught.value) == f"BatchAugmentation: {message}"


def test_mix_out_of_range_is_refused():
    with pytest.raises(ValueError, match="mix"):
        BatchAugmentation(mix=1.5)


@pytest.mark.parametrize("augmentation", [BatchAugmentation(mix=0.5), BatchAugmentation(noise_std=0.1),
                                          BatchAugmentation(degrees=10)], ids=["mix", "noise", "geometry"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_a_batch_keeps_its_floating_dtype(augmentation, dtype):
    """A '-true' precision converts the batch before the datamodule's transfer hook: float32 out of a bf16 batch
    would meet bf16 weights in the first layer."""
    torch.manual_seed(0)
    assert augmentation(torch.rand(4, 1, 8, 8, dtype=dtype)).dtype == dtype


def test_rotation_keeps_distances_on_a_wide_image():
    """A bright square 12 pixels right of the centre of a 32 x 64 image stays 12 pixels from it under any
    rotation (affine_grid's coordinates scale x and y apart: unscaled, the spot would move onto an ellipse)."""
    torch.manual_seed(0)
    image = torch.zeros(64, 1, 32, 64)
    image[..., 15:18, 43:46] = 1.0  # centred at (16, 44): the image's centre is (15.5, 31.5)
    out = BatchAugmentation(degrees=90)(image)
    rows = torch.arange(32, dtype=torch.float32).view(1, 1, 32, 1)
    cols = torch.arange(64, dtype=torch.float32).view(1, 1, 1, 64)
    mass = out.sum(dim=(1, 2, 3))
    row = (out * rows).sum(dim=(1, 2, 3)) / mass
    col = (out * cols).sum(dim=(1, 2, 3)) / mass
    distance = torch.hypot(row - 15.5, col - 31.5)
    original = float(torch.hypot(torch.tensor(16.0 - 15.5), torch.tensor(44.0 - 31.5)))
    assert (distance - original).abs().max() < 0.5, distance


def test_shift_and_flip_is_a_padded_crop_and_a_mirror_by_whole_pixels():
    """Each image is its padded copy cropped at the drawn offset (torchvision's RandomCrop with padding), then
    mirrored where drawn; the draws come from the generator given (the same seed moves alike, the global stream
    stays), and every gradient reaches the pixel it came from."""
    pixels = torch.rand(6, 2, 5, 7, requires_grad=True)
    state = torch.get_rng_state()
    moved = shift_and_flip(pixels, 2, True, torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(moved, shift_and_flip(pixels, 2, True, torch.Generator().manual_seed(3)))
    draws = torch.Generator().manual_seed(3)
    offsets = torch.randint(0, 5, (2, 6), generator=draws)
    mirrored = torch.rand(6, generator=draws) < 0.5
    padded = torch.nn.functional.pad(pixels.detach(), (2, 2, 2, 2))
    for i in range(6):
        crop = padded[i, :, offsets[0, i]: offsets[0, i] + 5, offsets[1, i]: offsets[1, i] + 7]
        assert torch.equal(moved[i].detach(), crop.flip(-1) if mirrored[i] else crop)
    assert 0 < int(mirrored.sum()) < 6 and int((offsets != 2).sum()) > 0  # this seed moves and mirrors some
    moved.sum().backward()  # each output pixel is one input pixel or black: counts of uses, at most 1 here
    assert set(pixels.grad.unique().tolist()) <= {0.0, 1.0} and pixels.grad.sum() > 0
    assert torch.equal(shift_and_flip(pixels.detach(), 0, False, torch.Generator()), pixels.detach())
