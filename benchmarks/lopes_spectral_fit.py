"""How well do the spectral objectives' kept numbers describe the record? For a recorded teacher (Lopes et al.
2017 metadata), the recorded linear layers' per-class activations (the class means, and draws from the class
Gaussians) are projected onto the lowest-frequency graph-Fourier basis the spectral objectives keep, and compared
with keeping as many numbers as raw units (an evenly spaced subset of every layer's units, as an all-layers
objective restricted to that budget would). Prints, per kept fraction, the relative reconstruction error of each
(lower: the kept numbers say more about the record), side by side. Reads only the metadata and the teacher.

    python benchmarks/lopes_spectral_fit.py --metadata runs/mnist/lopes/lenet5.metadata.safetensors \\
        --teacher benchmarks/teachers/mnist_lenet5.safetensors
"""

from __future__ import annotations

import argparse

import torch

from zskd_lightning import FrozenTeacher
from zskd_lightning.metadata import read_metadata
from zskd_lightning.metadata.file import LOGITS
from zskd_lightning.synthesis.methods.lopes2017 import linear_chain, low_frequency_basis
from zskd_lightning.taps import submodule


def relative_error(signals: torch.Tensor, kept: torch.Tensor) -> float:
    """``||x - P x|| / ||x||`` over the rows of ``signals [n, d]``, with ``P`` the projection onto the orthonormal
    columns of ``kept [d, k]``."""
    residual = signals - (signals @ kept) @ kept.T
    return float(residual.norm() / signals.norm())


def unit_subset(sizes: list[int], total: int) -> torch.Tensor:
    """``[d, total]`` columns of the identity picking ``total`` units, evenly spaced within each layer and shared
    between the layers in proportion to their sizes (largest remainders; at least one a layer while ``total``
    allows), so that both sides of the comparison keep exactly as many numbers."""
    if not 0 < total <= sum(sizes):
        raise ValueError(f"total must be in 1..{sum(sizes)} (the units), got {total}")
    share = [total * size / sum(sizes) for size in sizes]
    floor = 1 if total >= len(sizes) else 0  # one unit a layer, where the budget allows it
    counts = [min(size, max(floor, int(s))) for s, size in zip(share, sizes)]
    by_remainder = sorted(range(len(sizes)), key=lambda i: share[i] - int(share[i]), reverse=True)
    while sum(counts) != total:  # each pass moves the sum toward total, never past it
        step = 1 if sum(counts) < total else -1
        for i in by_remainder if step > 0 else reversed(by_remainder):
            if sum(counts) != total and floor <= counts[i] + step <= sizes[i]:
                counts[i] += step
    columns, offset = [], 0
    for size, count in zip(sizes, counts):  # evenly spaced, exact integer positions: never the same unit twice
        picks = [(k * (size - 1)) // max(count - 1, 1) for k in range(count)]
        columns.append(torch.tensor(picks, dtype=torch.long) + offset)
        offset += size
    chosen = torch.cat(columns)
    return torch.eye(offset, dtype=torch.float64)[:, chosen]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metadata", required=True)
    parser.add_argument("--teacher", required=True, help="the teacher's checkpoint (its architecture recorded in it)")
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.05, 0.1, 0.25, 0.5])
    parser.add_argument("--draws", type=int, default=200, help="draws per class from the recorded Gaussians")
    args = parser.parse_args(argv)
    teacher = FrozenTeacher(checkpoint=args.teacher)
    record = read_metadata(args.metadata, teacher_fingerprint=teacher.fingerprint())
    names = [n for n in record.layers if n != LOGITS and isinstance(submodule(teacher.network, n), torch.nn.Linear)]
    linears = linear_chain(teacher.network, names)
    sizes = [m.out_features for m in linears]
    means = torch.cat([record.layers[n].mean for n in names], dim=1)  # [K, d]
    generator = torch.Generator().manual_seed(0)
    draws = []
    for n in names:
        layer = record.layers[n]
        z = torch.randn(len(layer.mean), args.draws, layer.mean.shape[1], generator=generator, dtype=torch.float64)
        if layer.kept == "full":
            factor = torch.linalg.cholesky(layer.spread + 1e-6 * torch.eye(layer.spread.shape[-1], dtype=torch.float64))
            draws.append(layer.mean[:, None, :] + z @ factor.transpose(-1, -2))
        else:
            draws.append(layer.mean[:, None, :] + z * layer.std[:, None, :])
    samples = torch.cat(draws, dim=2).reshape(-1, sum(sizes))
    print(f"layers {names} ({sum(sizes)} units), {len(means)} classes, {args.draws} draws per class")
    print(f"{'kept':>6}{'numbers':>9}  {'class means: spectral':>22}{'units':>8}  {'draws: spectral':>16}{'units':>8}")
    for fraction in args.fractions:
        spectral = low_frequency_basis(linears, fraction)
        units = unit_subset(sizes, spectral.shape[1])
        print(f"{fraction:>6.2f}{spectral.shape[1]:>5}/{units.shape[1]:<4}  {relative_error(means, spectral):>22.3f}"
              f"{relative_error(means, units):>8.3f}  {relative_error(samples, spectral):>16.3f}"
              f"{relative_error(samples, units):>8.3f}")


if __name__ == "__main__":
    main()
