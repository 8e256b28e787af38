"""Synthesis throughput: the library's impression synthesis beside a plain PyTorch loop, in one process.

    python benchmarks/synthesis_throughput.py [--models lenet5 alexnet] [--iterations 40 10] [--precisions 32-true bf16-mixed] [--repeats 3]

The plain loop is what one writes by hand: random-init inputs, ``torch.optim.Adam`` on them, cross-entropy to
Dirichlet soft targets at T = 20, a batch of 256, ``iterations`` steps. The library runs the same objective,
the same optimizer and the same number of steps per impression through ``ZSKDSynthesizer.invert``, chunk
by chunk as the synthesis callback does on each device (its speed comes from running the teacher on
channels-last inputs and weights, AlexNet's LocalResponseNorm as a banded 1x1 convolution:
zskd_lightning/kernels.py, and, with ``precision="bf16-mixed"``, bf16 autocast for the teacher's
forward/backward while the inputs and their Adam state stay float32). The library is measured once per
``--precisions`` entry; the plain loop is float32. Both use untrained teachers with a fixed seed (throughput
does not depend on the weights). bf16 pays off where the hardware has native bf16 (AVX512-BF16/AMX CPUs,
GPUs); the accuracy of a student from bf16 impressions is the table's zskd_bf16 row (not a default row, not yet
measured: ``table.py --dataset mnist --rows zskd_bf16``).

Printed per model: impression-iterations per second of each path (the median of ``--repeats`` rounds, the
paths interleaved within each round so that a slow spell of a shared machine hits all of them), their ratio,
and peak memory: the most memory the path adds for one batch (plain loop) or chunk (library) of impressions
(more of them, or more iterations, reuse it). On a GPU that is the CUDA peak allocation, measured in this
process. On CPU it is the peak resident set size above the size just before the path, measured for each path
in a fresh process: freed CPU memory often stays with the process, so in one process a later path would reuse
an earlier path's pages and seem to need nothing.

For LeNet-5 a second line compares finished impressions per second at each path's schedule: the plain loop at
the paper's 1500 iterations, the library at the shipped fast MNIST config's iterations (300). Neither path
stops early, so this is the measured impression-iteration rate divided by the iterations per impression. The
students made at the two schedules are the table's zskd_paper row (``table.py --schedule paper``, not yet measured
on the full MNIST) and its zskd row (benchmarks/results/mnist.md).

The online generator path (``--generator-models alexnet lenet5``, CIFAR and MNIST shapes): generated image-steps
per second of rounds of ``--generator-steps`` Adam steps on a DCGAN-like generator (the library's
``ImageGenerator``, ``--generator-width`` 64 as the CIFAR configs or 32 as the MNIST ones, a batch of
``--plain-batch``, 256), with
FastDFKD's terms (BatchNorm statistics 10 where the teacher has BatchNorm, cross-entropy to the teacher's argmax
0.5, agreeing-only adversarial KL 1.1, as configs/cifar10/fast_alexnet_half.yaml): a plain hand-written loop
(forward hooks, float32) beside the library's ``FastSynthesizer.round`` once per precision (its
``precision`` argument: ``bf16-mixed`` runs the generator and both networks under bf16 autocast). Both include
the student's forward pass, which the adversarial term needs, and neither computes the student's weight
gradients (the plain loop's student is frozen; the library differentiates the generator's parameters only). The
library's teacher is a default ``FrozenTeacher`` (AlexNet's LRN banded, as the shipped configs run it); the plain
loop's keeps the stock layers.
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import resource
import statistics
import subprocess
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
import yaml

from zskd_lightning.models import AlexNet, AlexNetHalf, LeNet5, LeNet5Half
from zskd_lightning.synthesis import FastSynthesizer, ZSKDSynthesizer
from zskd_lightning.synthesis.generator import ImageGenerator
from zskd_lightning.pixels import InputSpec
from zskd_lightning.synthesis import Chunk, SynthesisContext
from zskd_lightning.teacher import FrozenTeacher

#: Adam steps per impression measured by default: each model's takes a few seconds a path on 2 CPU cores.
ITERATIONS = {"lenet5": 40, "alexnet": 10}

MODELS = {
    # name: (teacher class, input shape, per-channel normalization mean, std)
    "lenet5": (LeNet5, (1, 32, 32), (0.1307,), (0.3081,)),
    "alexnet": (AlexNet, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


FAST_MNIST_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mnist" / "zskd_lenet5_half_fast.yaml"
PAPER_ITERATIONS = ZSKDSynthesizer().iterations  # the synthesizer's defaults are the paper's (1500 at lr 0.01)


def fast_config_iterations() -> int:
    """Adam iterations per impression in the shipped fast MNIST config."""
    config = yaml.safe_load(FAST_MNIST_CONFIG.read_text())
    return int(config["data"]["init_args"]["synthesizer"]["init_args"]["iterations"])


def resident_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since start or :func:`reset_peak_resident`) of this process, MiB.
    Without /proc (not Linux), both are the lifetime peak from ``getrusage``."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # bytes on macOS
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) / 1024


def reset_peak_resident() -> bool:
    """Restart this process's peak-RSS count (``VmHWM``) from its current size, where Linux allows it; whether
    it did (the peak then reads no more than the current size plus what the kernel allots meanwhile)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return resident_mib("VmHWM") <= resident_mib("VmRSS") + 1.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop(teacher, targets, input_range, iterations, batch_size, device) -> float:
    """Seconds for ``iterations`` Adam steps on each of ``len(targets)`` impressions, ``batch_size`` at a time."""
    low, high = (b.to(device) for b in input_range)
    started = time.perf_counter()
    for first in range(0, len(targets), batch_size):
        y = targets[first : first + batch_size].to(device)
        x = low + (high - low) * torch.rand(len(y), *teacher.input_spec.shape, device=device)
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
    context = synthesis_context(teacher, device)
    started = time.perf_counter()
    for index, first in enumerate(range(0, count, chunk)):
        synthesizer.invert(context, Chunk.of(0, index, first, min(first + chunk, count)))
    sync(device)
    return time.perf_counter() - started


def build_teacher(name: str, count: int, device: torch.device
                  ) -> tuple[FrozenTeacher, tuple[Tensor, Tensor], Tensor]:
    """An untrained ``name`` teacher (seed 0) with ``input_spec`` set, its normalized input range (per-channel
    ``[C, 1, 1]`` min and max) and Dirichlet soft targets ``[count, 10]`` for the plain loop. The teacher keeps
    its stock layers and layout (the plain loop's); the library runs a copy held as shipped configs hold it
    (:func:`shipped_teacher`) and applies its own faster paths."""
    network_cls, shape, mean, std = MODELS[name]
    torch.manual_seed(0)
    teacher = FrozenTeacher(network=network_cls(in_channels=shape[0], num_classes=10), fast_kernels=False,
                            channels_last=False).to(device)
    teacher.input_spec = InputSpec(shape, mean, std)
    shipped_teacher(teacher)
    context = synthesis_context(teacher, device)
    sampler = ZSKDSynthesizer()
    sampler.setup(context)
    targets, _ = sampler.target_sampler.sample(Chunk.of(0, 0, 0, count), context)
    return teacher, teacher.input_spec.valid_range(), targets


def synthesis_context(teacher: FrozenTeacher, device: torch.device, student=None) -> SynthesisContext:
    """What the library's synthesis runs with for ``teacher`` (its ``input_spec`` set by :func:`build_teacher`):
    its weights held as a shipped config holds them (:func:`shipped_teacher`)."""
    return SynthesisContext(teacher=shipped_teacher(teacher), input_spec=teacher.input_spec, num_classes=10,
                            device=device, student=student)


_SHIPPED: weakref.WeakKeyDictionary[FrozenTeacher, FrozenTeacher] = weakref.WeakKeyDictionary()


def shipped_teacher(teacher: FrozenTeacher) -> FrozenTeacher:
    """A copy of ``teacher``'s network in a default ``FrozenTeacher`` (channels-last weights and AlexNet's LRN as a
    banded convolution, as the shipped configs run it; ``teacher`` keeps the stock layers and layout for the plain
    loop). Made once per teacher, by
    :func:`build_teacher`, so that it is in memory before any path's peak is measured."""
    if teacher not in _SHIPPED:
        shipped = FrozenTeacher(network=copy.deepcopy(teacher.network))
        shipped.input_spec = teacher.input_spec
        _SHIPPED[teacher] = shipped
    return _SHIPPED[teacher]


def run_path(path: str, teacher, input_range, targets, iterations: int, plain_batch: int, chunk: int,
             device: torch.device, synthesizer: ZSKDSynthesizer | None = None) -> float:
    """Seconds for ``path`` (``"plain"`` or a library precision) to make ``len(targets)`` impressions."""
    if path == "plain":
        return plain_loop(teacher, targets, input_range, iterations, plain_batch, device)
    if synthesizer is None:
        synthesizer = ZSKDSynthesizer(iterations=iterations, lr=0.01, precision=path)
        synthesizer.setup(synthesis_context(teacher, device))
    return library(teacher, synthesizer, len(targets), chunk, input_range, device)


def memory_of_path(name: str, path: str, iterations: int, plain_batch: int, chunk: int,
                   device: torch.device) -> float:
    """MiB ``path`` adds at its peak, in this process, for one batch or chunk: CUDA peak allocation, or on CPU
    peak RSS above the RSS just before the path (on CPU run it in a fresh process: ``--memory-child``)."""
    teacher, input_range, targets = build_teacher(name, plain_batch if path == "plain" else chunk, device)
    # Two impressions, one step first: loads the kernels' code and one-off state, which a bigger batch would not
    # need again, while the tensors it frees are too small to be reused by the measured batch.
    run_path(path, teacher, input_range, targets[:2], 1, plain_batch, 2, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
    else:
        before = resident_mib("VmRSS")
        if not reset_peak_resident():  # the peak would be the process's lifetime one: no figure rather than a wrong one
            return math.nan
    run_path(path, teacher, input_range, targets, min(iterations, 3), plain_batch, chunk, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else resident_mib("VmHWM")
    return max(peak - before, 0.0)


def memory_of_paths(name: str, paths: list[str], iterations: int, plain_batch: int, chunk: int,
                    device: torch.device) -> dict[str, float]:
    """Peak MiB each path adds for one batch or chunk (see the module docstring)."""
    memory = {}
    for path in paths:
        if device.type == "cuda":
            memory[path] = memory_of_path(name, path, iterations, plain_batch, chunk, device)
            continue
        child = [sys.executable, __file__, "--memory-child", name, path, "--iterations", str(iterations),
                 "--plain-batch", str(plain_batch), "--chunk", str(chunk), "--device", "cpu",
                 "--threads", str(torch.get_num_threads())]
        done = subprocess.run(child, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory measurement of {name} {path} failed:\n{done.stderr[-2000:]}")
        memory[path] = float(done.stdout.split()[-1])
    return memory


def measure(name: str, count: int, iterations: int, plain_batch: int, chunk: int, device: torch.device,
            precisions: list[str], repeats: int, with_memory: bool = True) -> dict[str, float]:
    """Plain loop and the library once per precision, ``repeats`` interleaved rounds; figures keyed ``plain_*``
    and ``<precision>_*`` (median seconds -> impression-iterations/s, ratio to the plain loop, peak memory)."""
    teacher, input_range, targets = build_teacher(name, count, device)
    synthesizers = {}
    for precision in precisions:
        synthesizers[precision] = ZSKDSynthesizer(iterations=iterations, lr=0.01, precision=precision)
        synthesizers[precision].setup(synthesis_context(teacher, device))
    seconds: dict[str, list[float]] = {path: [] for path in ["plain", *precisions]}
    # Warm-up each path on its first chunk at the measured iterations (the library's synthesizer runs its own, so the
    # plain loop runs them too), then measure the same number of impression-iterations.
    first_batch = targets[: max(plain_batch, chunk)]
    for path in seconds:
        run_path(path, teacher, input_range, first_batch, iterations, plain_batch, chunk, device,
                 synthesizers.get(path))
    for _ in range(repeats):
        for path in seconds:
            seconds[path].append(run_path(path, teacher, input_range, targets, iterations, plain_batch, chunk,
                                          device, synthesizers.get(path)))
    memory = memory_of_paths(name, list(seconds), iterations, plain_batch, chunk, device) if with_memory else {}
    work = count * iterations
    median = {path: statistics.median(times) for path, times in seconds.items()}
    figures = {}
    for path in seconds:
        figures[f"{path}_ips"] = work / median[path]
        figures[f"{path}_ratio"] = median["plain"] / median[path]
        figures[f"{path}_mem"] = memory.get(path, math.nan)
    return figures


GENERATOR_STUDENTS = {"alexnet": AlexNetHalf, "lenet5": LeNet5Half}  # BatchNorm term only where the teacher has it
GENERATOR_LR = 4e-3  # configs/cifar10/fast_alexnet_half.yaml


def plain_generator_loop(teacher, student, generator, rounds: int, steps: int, batch: int, device) -> float:
    """Seconds for ``rounds`` x ``steps`` hand-written generator steps (see the module docstring)."""
    norms = [m for m in teacher.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    seen: list[tuple[torch.nn.Module, Tensor]] = []
    hooks = [m.register_forward_hook(lambda module, args, out: seen.append((module, args[0]))) for m in norms]
    optimizer = torch.optim.Adam(generator.parameters(), lr=GENERATOR_LR, betas=(0.5, 0.999))
    try:
        started = time.perf_counter()
        for _ in range(rounds):
            noise = torch.randn(batch, generator.noise_dim, device=device)
            for _ in range(steps):
                seen.clear()
                x = generator(noise)
                t, s = teacher(x), student(x)
                bn = sum(torch.linalg.vector_norm(f.mean(dims) - m.running_mean)
                         + torch.linalg.vector_norm(f.var(dims, unbiased=False) - m.running_var)
                         for m, f in seen for dims in [[0, 2, 3] if f.dim() == 4 else [0]])
                log_t, log_s = F.log_softmax(t, dim=1), F.log_softmax(s, dim=1)
                agree = (t.argmax(1) == s.argmax(1)).float()
                kl = ((log_t.exp() * (log_t - log_s)).sum(1) * agree).mean()
                loss = 10.0 * bn + 0.5 * F.cross_entropy(t, t.argmax(1)) - 1.1 * kl
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        sync(device)
        return time.perf_counter() - started
    finally:
        for hook in hooks:
            hook.remove()


def library_generator(synthesizer: FastSynthesizer, context: SynthesisContext, rounds: int) -> float:
    """Seconds for ``rounds`` of the library's generator rounds (as the online driver runs them)."""
    started = time.perf_counter()
    for index in range(rounds):
        synthesizer.round(context, Chunk.of(0, index, index * synthesizer.batch_size, (index + 1) * synthesizer.batch_size))
    sync(context.device)
    return time.perf_counter() - started


def measure_generator(name: str, rounds: int, steps: int, batch: int, device: torch.device, precisions: list[str],
                      repeats: int, width: int = 64) -> dict[str, float]:
    """Generated image-steps/s of the plain loop and the library per precision (median of ``repeats``
    interleaved rounds) and each one's ratio to the plain loop; keyed ``<path>_ips`` / ``<path>_ratio``."""
    teacher, input_range, _ = build_teacher(name, 2, device)
    torch.manual_seed(1)
    student = GENERATOR_STUDENTS[name](in_channels=teacher.input_spec.shape[0], num_classes=10).to(device).eval()
    student.requires_grad_(False)  # the plain loop's backward would compute its weight gradients, which no path needs
    torch.manual_seed(2)
    plain = ImageGenerator(teacher.input_spec.shape, 100, width, None, input_range).to(device).train()
    has_batchnorm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in teacher.modules())
    synthesizers, contexts = {}, {}
    for precision in precisions:
        contexts[precision] = synthesis_context(teacher, device, student)
        synthesizers[precision] = FastSynthesizer(cross_entropy=0.5, adversarial=1.1,
                                                  batchnorm=10.0 if has_batchnorm else 0.0, activation=0.0,
                                                  balance=0.0, classes="teacher", batch_size=batch,
                                                  steps_per_round=steps, lr=GENERATOR_LR, width=width,
                                                  precision=precision)
        synthesizers[precision].setup(contexts[precision])

    def run(path: str, n: int) -> float:
        if path == "plain":
            return plain_generator_loop(teacher, student, plain, n, steps, batch, device)
        return library_generator(synthesizers[path], contexts[path], n)

    paths = ["plain", *precisions]
    for path in paths:  # warm-up
        run(path, 1)
    seconds: dict[str, list[float]] = {path: [] for path in paths}
    for _ in range(repeats):
        for path in paths:
            seconds[path].append(run(path, rounds))
    median = {path: statistics.median(times) for path, times in seconds.items()}
    work = rounds * steps * batch
    return {key: value for path in paths
            for key, value in ((f"{path}_ips", work / median[path]), (f"{path}_ratio", median["plain"] / median[path]))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--impressions", type=int, default=512, help="impressions made by each path")
    defaults = ", ".join(f"{model} {n}" for model, n in ITERATIONS.items())
    parser.add_argument("--iterations", type=int, nargs="+",
                        help="Adam steps per impression (both paths): one value for every model, or one per model "
                             f"in --models order (default: {defaults})")
    parser.add_argument("--plain-batch", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=256, help="impressions per library chunk (ImpressionDataModule's default)")
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"], choices=["32-true", "bf16-mixed"],
                        help="the library's synthesis precision(s) to measure (the plain loop is float32)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median time of each path is used")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--skip-memory", action="store_true", help="time the paths only (no peak-memory column)")
    parser.add_argument("--generator-models", nargs="*", default=list(GENERATOR_STUDENTS), choices=list(GENERATOR_STUDENTS),
                        help="teachers for the online generator path (none: skip it)")
    parser.add_argument("--generator-rounds", type=int, default=2, help="generator rounds per measurement")
    parser.add_argument("--generator-steps", type=int, default=5, help="generator steps per round (Fast-N)")
    parser.add_argument("--generator-width", type=int, default=64,
                        help="ImageGenerator width (the CIFAR configs' 64, the MNIST configs' 32)")
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.iterations is None:
        args.iterations = [ITERATIONS[name] for name in args.models]
    elif len(args.iterations) == 1:
        args.iterations = args.iterations * len(args.models)
    elif len(args.iterations) != len(args.models):
        parser.error(f"--iterations takes one value or one per model ({len(args.models)}: {' '.join(args.models)}), "
                     f"got {len(args.iterations)}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.memory_child:  # one CPU memory figure, in the fresh process memory_of_paths started
        print(memory_of_path(*args.memory_child, args.iterations[0], args.plain_batch, args.chunk, device))
        return
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {where}; torch {torch.__version__}; {args.impressions} impressions per path")
    print(f"{'model':8s} {'path':24s} {'imp-it/s':>9s} {'ratio':>6s} {'peak MiB':>9s}")
    for name, iterations in zip(args.models, args.iterations):
        r = measure(name, args.impressions, iterations, args.plain_batch, args.chunk, device, args.precisions,
                    args.repeats, with_memory=not args.skip_memory)
        for path in ["plain", *args.precisions]:
            label = "plain loop (float32)" if path == "plain" else f"library ({path})"
            memory = "-" if math.isnan(r[path + "_mem"]) else f"{r[path + '_mem']:.1f}"
            print(f"{name:8s} {label:24s} {r[path + '_ips']:9.0f} {r[path + '_ratio']:6.2f} {memory:>9s}", flush=True)
        if name == "lenet5":
            fast = fast_config_iterations()
            plain_rate = r["plain_ips"] / PAPER_ITERATIONS
            for precision in args.precisions:
                rate = r[precision + "_ips"] / fast
                print(f"lenet5 finished impressions/s: plain loop at the paper's {PAPER_ITERATIONS} iterations "
                      f"{plain_rate:.1f}, library ({precision}) at the fast config's {fast} {rate:.1f}: ratio "
                      f"{rate / plain_rate:.2f}", flush=True)
    if args.generator_models:
        print(f"{'model':8s} {'path':24s} {'img-st/s':>9s} {'ratio':>6s}   (generated images x generator steps per "
              f"second, a batch of {args.plain_batch})")
    for name in args.generator_models:
        r = measure_generator(name, args.generator_rounds, args.generator_steps, args.plain_batch, device,
                              args.precisions, args.repeats, args.generator_width)
        for path in ["plain", *args.precisions]:
            label = "generator plain (fp32)" if path == "plain" else f"generator lib ({path})"
            print(f"{name:8s} {label:24s} {r[path + '_ips']:9.0f} {r[path + '_ratio']:6.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
