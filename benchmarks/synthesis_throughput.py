"""Synthesis throughput: the library's impression synthesis beside a plain PyTorch loop, in one process.

    python benchmarks/synthesis_throughput.py [--iterations 40] [--models lenet5 alexnet]

The plain loop is what one writes by hand: random-init inputs, ``torch.optim.Adam`` on them, cross-entropy to
Dirichlet soft targets at T = 20, a batch of 256, ``iterations`` steps. The library runs the same objective,
the same optimizer and the same number of steps per impression through ``ZSKDSynthesizer.synthesize``, chunk
by chunk as the synthesis callback does on each device (its speed comes from running the teacher on
channels-last inputs and weights, and AlexNet's LocalResponseNorm as a banded 1x1 convolution:
zskd_lightning/synthesis/kernels.py). Both use untrained teachers with a
fixed seed (throughput does not depend on the weights).

Printed per model: impression-iterations per second of each path, their ratio, and peak memory (CUDA peak
allocation on a GPU; on CPU the growth of the process's peak RSS, which only ever grows, so each figure is
an upper bound for its own path). The speed-up of a shorter schedule (fewer iterations at a higher lr,
which reaches the same loss) is measured separately in benchmarks/results (time per finished impression).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch
import torch.nn.functional as F

from zskd_lightning.models import AlexNet, LeNet5
from zskd_lightning.synthesis import ZSKDSynthesizer
from zskd_lightning.synthesis.base import ChunkRandomness
from zskd_lightning.teacher import FrozenTeacher

MODELS = {
    # name: (teacher class, input shape, per-channel normalization mean, std)
    "lenet5": (LeNet5, (1, 32, 32), (0.1307,), (0.3081,)),
    "alexnet": (AlexNet, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return 0.0
    return peak_memory_mib(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop(teacher, targets, input_range, iterations, batch_size, device) -> float:
    """Seconds for ``iterations`` Adam steps on each of ``len(targets)`` impressions, ``batch_size`` at a time."""
    low, high = (b.to(device) for b in input_range)
    started = time.perf_counter()
    for first in range(0, len(targets), batch_size):
        y = targets[first : first + batch_size].to(device)
        x = low + (high - low) * torch.rand(len(y), *teacher.input_shape, device=device)
        x.requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=0.01)
        for _ in range(iterations):
            optimizer.zero_grad()
            loss = -(y * F.log_softmax(teacher(x) / 20.0, dim=1)).sum()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                x.clamp_(low, high)
    sync(device)
    return time.perf_counter() - started


def library(teacher, synthesizer, count, chunk, input_range, device) -> float:
    """Seconds for the library to synthesize ``count`` impressions, chunk by chunk as the callback does."""
    started = time.perf_counter()
    for index, first in enumerate(range(0, count, chunk)):
        synthesizer.synthesize(
            teacher,
            indices=torch.arange(first, min(first + chunk, count)),
            input_shape=teacher.input_shape,
            rng=ChunkRandomness.for_chunk(0, index),
            num_classes=10,
            input_range=input_range,
            device=device,
        )
    sync(device)
    return time.perf_counter() - started


def measure(name: str, count: int, iterations: int, plain_batch: int, chunk: int, device: torch.device) -> dict[str, float]:
    network_cls, shape, mean, std = MODELS[name]
    torch.manual_seed(0)
    teacher = FrozenTeacher(network=network_cls(in_channels=shape[0], num_classes=10)).to(device)
    teacher.input_shape = shape
    mean_t, std_t = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    input_range = ((0 - mean_t) / std_t, (1 - mean_t) / std_t)
    synthesizer = ZSKDSynthesizer(iterations=iterations, lr=0.01)
    synthesizer.setup(teacher)
    targets, _ = synthesizer.target_sampler.sample(torch.arange(count), 10, ChunkRandomness.for_chunk(0, 0))

    # Warm-up both paths (allocator, kernels), then measure the same number of impression-iterations.
    plain_loop(teacher, targets[:plain_batch], input_range, 3, plain_batch, device)
    warmup = ZSKDSynthesizer(iterations=3)
    warmup.setup(teacher)
    warmup.synthesize(teacher, torch.arange(min(chunk, 256)), shape, ChunkRandomness.for_chunk(0, 1), 10, input_range, device)
    before = reset_peak(device)
    plain_s = plain_loop(teacher, targets, input_range, iterations, plain_batch, device)
    plain_mem = peak_memory_mib(device) - before
    before = reset_peak(device)
    library_s = library(teacher, synthesizer, count, chunk, input_range, device)
    library_mem = peak_memory_mib(device) - before
    work = count * iterations
    return {
        "plain_ips": work / plain_s,
        "library_ips": work / library_s,
        "ratio": plain_s / library_s,
        "plain_mem": plain_mem,
        "library_mem": library_mem,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--impressions", type=int, default=512, help="impressions made by each path")
    parser.add_argument("--iterations", type=int, nargs="+", default=[40, 10],
                        help="Adam steps per impression, per model in --models order (both paths)")
    parser.add_argument("--plain-batch", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=256, help="impressions per library chunk (ImpressionDataModule's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {where}; torch {torch.__version__}; {args.impressions} impressions per path")
    print(f"{'model':8s} {'plain imp-it/s':>15s} {'library imp-it/s':>17s} {'ratio':>6s} {'plain peak MiB':>15s} {'lib peak MiB':>13s}")
    for name, iterations in zip(args.models, args.iterations * len(args.models)):
        r = measure(name, args.impressions, iterations, args.plain_batch, args.chunk, device)
        print(
            f"{name:8s} {r['plain_ips']:15.0f} {r['library_ips']:17.0f} {r['ratio']:6.2f} "
            f"{r['plain_mem']:15.1f} {r['library_mem']:13.1f}",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
