"""Faster stand-ins for teacher layers whose stock kernels are slow on CPU (synthesis and distillation).

``nn.LocalResponseNorm`` (the ZSKD AlexNet has two) computes its channel-window mean with ``avg_pool3d`` over a
padded 5-d view; forward and backward of that take most of an AlexNet synthesis step on CPU (profiled: ~60%,
convolutions ~25%). :class:`BandLocalResponseNorm` computes the same window mean as a 1x1 convolution of
``x^2`` with a fixed banded ``[C, C]`` matrix, a small matrix product that oneDNN/cuBLAS run fast, and is equal
to the stock layer up to float rounding (on CUDA in float32, cuDNN may run that convolution in TF32, as
``torch.backends.cudnn.allow_tf32`` says: the window mean is then rounded to about 1e-3 relative).
:func:`use_fast_kernels` swaps a module's LRN layers for it for good
(a :class:`~zskd_lightning.FrozenTeacher` does, by default); :func:`fast_kernels_in` swaps them only within a
block (a synthesis run) and puts the originals back afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BandLocalResponseNorm(nn.Module):
    """``nn.LocalResponseNorm(size, alpha, beta, k)`` as ``x * (k + alpha * band(x^2)) ** -beta``.

    ``band`` averages each channel's window ``[c - size // 2, c + (size - 1) // 2]`` over ``size`` (zero beyond
    the edges, as the stock layer pads): a 1x1 convolution with a ``[C, C, 1, 1]`` weight of ``1 / size`` inside
    the window, built once per channel count, device and dtype. The mean, not the sum, so that in float16 it
    overflows only where the stock layer's does. The convolution runs in the input's dtype, outside autocast (whose
    casting lists hold ``conv2d``), so a float32 input keeps float32 sums. Input ``[N, C, H, W]``; output the same
    shape and dtype. (On CUDA, TF32 convolutions, when allowed, round the window mean to about 1e-3 relative; the
    stock layer's pooling does not.)

    Under autocast a bfloat16 input (a convolution's output) stays bfloat16, where the stock layer computes and
    returns float32 (its pooling is on CPU autocast's float32 list, its ``pow`` on CUDA's): ``k + alpha * mean``
    then rounds to ``k`` where ``alpha * mean < k / 256``, so the output differs from the stock layer's by
    bfloat16's rounding (about 4e-3 relative), as every later convolution's input is rounded anyway. Computing in
    float32 there, as the stock layer does, slowed bf16 AlexNet synthesis from 688-719 to 418
    impression-iterations/s (2 cores, AMD EPYC: ``python benchmarks/synthesis_throughput.py --models alexnet
    --iterations 10 --impressions 256 --skip-memory --generator-models``), so it is not done.
    """

    def __init__(self, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0) -> None:
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k
        self._bands: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}

    @classmethod
    def like(cls, layer: nn.LocalResponseNorm) -> BandLocalResponseNorm:
        return cls(layer.size, layer.alpha, layer.beta, layer.k)

    def band(self, channels: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (channels, device, dtype)
        # Built outside inference mode: a band first built under it (a validation step) would be an inference
        # tensor, which autograd refuses to save when a later forward needs gradients (synthesis).
        if key not in self._bands:
            with torch.inference_mode(False):
                self._bands[key] = self._built(channels, device, dtype)
        return self._bands[key]

    def _built(self, channels: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The matrix ``[C, C, 1, 1]`` holding ``1 / size`` where, for each output channel, the input channels of its
        window are, 0 elsewhere."""
        offset = torch.arange(channels).view(1, -1) - torch.arange(channels).view(-1, 1)  # c_in - c_out
        inside = (offset >= -(self.size // 2)) & (offset <= (self.size - 1) // 2)
        return (inside.double() / self.size).to(device=device, dtype=dtype).view(channels, channels, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:  # the band trick is written for images; other ranks keep the stock computation
            return F.local_response_norm(x, self.size, self.alpha, self.beta, self.k)
        with torch.autocast(x.device.type, enabled=False):
            window_mean = F.conv2d(x * x, self.band(x.shape[1], x.device, x.dtype))
        return x * (self.k + self.alpha * window_mean).pow(-self.beta)


def use_fast_kernels(module: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Replace every ``nn.LocalResponseNorm`` inside ``module`` by a :class:`BandLocalResponseNorm`, in place (so
    hooks on other layers stay valid). Returns ``(parent, name, original)`` for each layer replaced."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.LocalResponseNorm:
                setattr(parent, name, BandLocalResponseNorm.like(child))
                swapped.append((parent, name, child))
    return swapped


@contextlib.contextmanager
def fast_kernels_in(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, every ``nn.LocalResponseNorm`` inside ``module`` is a :class:`BandLocalResponseNorm`
    (:func:`use_fast_kernels`); the swap is undone on exit, even on error."""
    swapped = use_fast_kernels(module) if enabled else []
    try:
        yield
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)


def in_channels_last(module: nn.Module) -> bool:
    """Whether ``module`` has 4-d parameters or buffers and all of them are in channels-last (NHWC) layout."""
    tensors = [t for t in (*module.parameters(), *module.buffers()) if t.dim() == 4]
    return bool(tensors) and all(t.is_contiguous(memory_format=torch.channels_last) for t in tensors)


def default_layout(x: Tensor) -> Tensor:
    """``x [N, C, H, W]`` with row-major (NCHW) strides: as it is when it has them, else a copy. ``.contiguous()``
    is not enough: a one-channel channels-last tensor (strides ``(HW, 1, W, 1)``) counts as contiguous, a
    convolution follows its channels-last strides, and a ``.view`` of the output fails. For a network fed inputs
    in a layout it was not written for (the student during synthesis, a teacher with ``channels_last=False``).
    Tensors of other ranks are returned as they are."""
    if x.dim() != 4:
        return x
    _, channels, height, width = x.shape
    if x.stride() == (channels * height * width, height * width, width, 1):
        return x
    return x.clone(memory_format=torch.contiguous_format)
