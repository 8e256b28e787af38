"""Vectorised per-sample augmentation of whole batches (one ``grid_sample`` or one gather, on the batch's device).

Per-sample ``torchvision.transforms.v2`` pipelines cost ~1 ms per image on a CPU core; this applies a
different random affine transform to every image of a ``[B, C, H, W]`` batch at once, which is what
distillation on impressions (re-labelled by the teacher on every augmented batch) needs to stay cheap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zskd_lightning.errors import InvalidArgument
from zskd_lightning.pixels import from_pixels, to_pixels


class BatchAugmentation(nn.Module):
    """Random affine (rotation, translation, scale), optional horizontal flip and Gaussian noise, per sample.

    Works in pixel space: inputs ``[B, C, H, W]`` with values in [0, 1] (0 = black); areas moved in from
    outside the image are filled with ``fill`` (pixel value). Randomness comes from the global torch RNG of the
    batch's device; a :class:`~zskd_lightning.data.SyntheticDataModule` seeds it per batch (and restores it)
    around the call, so its runs resume exactly.

    Args:
        degrees: rotation angle drawn uniformly from ``[-degrees, degrees]``.
        translate: maximal shift as a fraction of width and height, drawn in the source image's frame (before the
            rotation and zoom: the output shows it rotated and scaled by the zoom, so ``translate=(0.1, 0.1)`` with
            10 degrees and zoom up to 1.1 moves content up to 0.127 of the width sideways; torchvision's
            ``RandomAffine`` shifts after them).
        scale: zoom factor range ``(min, max)``.
        hflip: flip half of the images horizontally.
        noise_std: standard deviation of additive Gaussian pixel noise (0: none); the result is clamped to [0, 1].
        fill: pixel value for areas outside the source image.
        mix: blend every image with a random partner of the same batch (a random permutation's: itself with
            probability ``1 / B``), ``(1 - w) * x + w * x_other`` with ``w`` uniform in ``[0, mix]`` per image
            (0: off). The labels no longer fit the blend, so only for batches
            the teacher re-labels (distillation with ``target_source="teacher"``); labelled real-data modules
            refuse it. On MNIST impressions, ``mix=0.5`` added 2-3 points to the student (validation split).
    """

    def __init__(
        self,
        degrees: float = 0.0,
        translate: Sequence[float] = (0.0, 0.0),
        scale: Sequence[float] = (1.0, 1.0),
        hflip: bool = False,
        noise_std: float = 0.0,
        fill: float = 0.0,
        mix: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= float(mix) <= 1.0:
            raise InvalidArgument(f"mix must be in [0, 1], got {mix}")
        problems = [f"{name} must be {rule}, got {value}" for name, value, ok, rule in (
            ("degrees", degrees, float(degrees) >= 0, ">= 0"),
            ("translate", list(translate), len(translate) == 2 and all(0 <= float(t) <= 1 for t in translate),
             "two fractions in [0, 1]"),
            ("scale", list(scale), len(scale) == 2 and 0 < float(scale[0]) <= float(scale[1]), "(min, max), 0 < min <= max"),
            ("noise_std", noise_std, float(noise_std) >= 0, ">= 0"),
            ("fill", fill, 0 <= float(fill) <= 1, "a pixel value in [0, 1]")) if not ok]
        if problems:
            raise InvalidArgument(f"BatchAugmentation: {'; '.join(problems)}")
        self.degrees = float(degrees)
        self.translate = (float(translate[0]), float(translate[1]))
        self.scale = (float(scale[0]), float(scale[1]))
        self.hflip = hflip
        self.noise_std = float(noise_std)
        self.fill = float(fill)
        self.mix = float(mix)

    @property
    def moves_pixels(self) -> bool:
        """Whether the geometric part (rotation, shift, zoom, flip) does anything."""
        return self.degrees > 0 or self.translate != (0.0, 0.0) or self.scale != (1.0, 1.0) or self.hflip

    def forward(self, pixels: Tensor) -> Tensor:
        """``pixels [B, C, H, W]`` in [0, 1] -> augmented ``[B, C, H, W]``, in the input's floating dtype (float32
        for integer pixels; a '-true' precision's batch stays in its dtype)."""
        out = self._move(pixels) if self.moves_pixels else pixels if pixels.is_floating_point() else pixels.float()
        if self.mix > 0:
            weight = self.mix * torch.rand(out.shape[0], 1, 1, 1, device=out.device, dtype=out.dtype)
            partner = torch.randperm(out.shape[0], device=out.device)
            out = (1 - weight) * out + weight * out[partner]
        if self.noise_std > 0:
            out = (out + self.noise_std * torch.randn_like(out)).clamp_(0.0, 1.0)
        return out

    def _move(self, pixels: Tensor) -> Tensor:
        batch = pixels.shape[0]
        device, dtype = pixels.device, pixels.dtype if pixels.is_floating_point() else torch.float32

        def uniform(low: float, high: float) -> Tensor:
            return low + (high - low) * torch.rand(batch, device=device, dtype=dtype)

        angle = uniform(-self.degrees, self.degrees) * (math.pi / 180.0)
        zoom = uniform(*self.scale)
        # affine_grid maps output coordinates in [-1, 1] to input coordinates: the inverse transform. Its x and y
        # are scaled by 2 / W and 2 / H, so a rotation's off-diagonal terms carry H / W and W / H (1 when square).
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        height, width = pixels.shape[-2], pixels.shape[-1]
        flip = torch.where(torch.rand(batch, device=device) < 0.5, -1.0, 1.0).to(dtype) if self.hflip else 1.0
        theta = torch.zeros(batch, 2, 3, device=device, dtype=dtype)
        theta[:, 0, 0], theta[:, 0, 1] = cos * flip, -sin * (height / width)
        theta[:, 1, 0], theta[:, 1, 1] = sin * flip * (width / height), cos
        theta[:, 0, 2] = uniform(-2 * self.translate[0], 2 * self.translate[0])
        theta[:, 1, 2] = uniform(-2 * self.translate[1], 2 * self.translate[1])
        grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
        shifted = pixels.to(dtype) - self.fill
        return F.grid_sample(shifted, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + self.fill


def augment_normalized(
    batch: Tensor, augmentation: nn.Module, input_range: tuple[Tensor, Tensor] | None
) -> Tensor:
    """Apply a pixel-space ``augmentation`` (moved to the batch's device) to a normalized batch whose per-channel
    valid range is ``input_range``; with ``input_range=None`` the batch is augmented as it is, as pixels in [0, 1]
    (noise is clipped to that range, moved-in areas take ``fill``)."""
    augmentation = augmentation.to(batch.device)
    return from_pixels(augmentation(to_pixels(batch, input_range)), input_range)


def shift_and_flip(pixels: Tensor, shift: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Each image of ``pixels [B, C, H, W]`` moved by whole pixels ``(dy, dx)``, each drawn uniformly from
    ``[-shift, shift]`` (areas moved in are 0, black), then, with ``flip``, mirrored left-right with probability
    1/2: torchvision's ``RandomCrop(padding=shift)`` and ``RandomHorizontalFlip`` for a whole batch at once, as
    one gather, so gradients reach ``pixels``. The moves are ``3 B`` draws from ``generator`` (a CPU generator:
    the global streams do not move)."""
    batch, _, height, width = pixels.shape
    offsets = torch.randint(0, 2 * shift + 1, (2, batch), generator=generator)  # into the padded image
    mirrored = torch.rand(batch, generator=generator) < 0.5
    columns = offsets[1, :, None] + torch.arange(width)  # [B, W], in the padded image
    if flip:
        columns = torch.where(mirrored[:, None], columns.flip(-1), columns)
    rows = offsets[0, :, None] + torch.arange(height)  # [B, H]
    padded = F.pad(pixels, (shift, shift, shift, shift))
    device = pixels.device
    return padded[torch.arange(batch, device=device)[:, None, None, None],
                  torch.arange(pixels.shape[1], device=device)[None, :, None, None],
                  rows.to(device)[:, None, :, None], columns.to(device)[:, None, None, :]]
