"""Synthesis speed with a trained teacher's subnormal weights kept vs set to zero (what ``FrozenTeacher`` does).

    python benchmarks/subnormal_weights.py [--iterations 50] [--rounds 3]

Loads the committed MNIST benchmark teacher (LeNet-5 trained with weight decay, ``benchmarks/teachers/``), makes
one ZSKD chunk of 256 impressions at the fast MNIST config's settings through the library with each teacher
(the paths interleaved, median of ``--rounds``), and prints impression-iterations/s side by side, their ratio, and
whether the two paths made bit-identical impressions.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from zskd_lightning.pixels import InputSpec
from zskd_lightning.synthesis import Chunk, SynthesisContext, ZSKDSynthesizer
from zskd_lightning.synthesis.regularizers import PixelL2Prior
from zskd_lightning.teacher import FrozenTeacher, subnormal_mask

WEIGHTS = Path(__file__).resolve().parent / "teachers" / "mnist_lenet5.safetensors"
MNIST_SPEC = InputSpec((1, 32, 32), (0.1307,), (0.3081,))
CHUNK = 256


def teachers() -> dict[str, FrozenTeacher]:
    """The committed teacher as loaded (subnormals set to zero) and the same with its stored weights put back."""
    flushed = FrozenTeacher(checkpoint=str(WEIGHTS))
    kept = FrozenTeacher(checkpoint=str(WEIGHTS))
    kept.network.load_state_dict(load_file(str(WEIGHTS)))  # bypasses the flush
    left = sum(int(subnormal_mask(p).sum()) for p in kept.parameters())
    total = sum(p.numel() for p in kept.parameters())
    print(f"{WEIGHTS.name}: {left:,} of {total:,} weights subnormal (|w| < {torch.finfo(torch.float32).tiny:.3g}); "
          f"FrozenTeacher set {flushed.flushed_subnormals:,} to zero")
    return {"subnormals kept": kept, "subnormals zero": flushed}


def synthesize(teacher: FrozenTeacher, iterations: int) -> tuple[float, torch.Tensor]:
    """Seconds for one chunk of 256 ZSKD impressions (the fast MNIST config's settings) and the impressions."""
    teacher.input_spec = MNIST_SPEC
    context = SynthesisContext(teacher=teacher, input_spec=MNIST_SPEC, num_classes=10)
    synthesizer = ZSKDSynthesizer(betas=[1.0, 0.1], temperature=20.0, iterations=iterations, lr=0.65, init="normal",
                                  regularizers=[PixelL2Prior(weight=5e-4)])
    synthesizer.setup(context)
    started = time.perf_counter()
    result = synthesizer.invert(context, Chunk.of(0, 0, 0, CHUNK))
    return time.perf_counter() - started, result.inputs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=50, help="Adam steps per impression")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    paths = teachers()
    for teacher in paths.values():
        synthesize(teacher, 2)  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    inputs: dict[str, torch.Tensor] = {}
    for _ in range(args.rounds):
        for name, teacher in paths.items():
            s, inputs[name] = synthesize(teacher, args.iterations)
            seconds[name].append(s)
    rate = {name: CHUNK * args.iterations / statistics.median(s) for name, s in seconds.items()}
    print(f"{torch.get_num_threads()} threads, chunk {CHUNK}, {args.iterations} iterations, median of {args.rounds}:")
    for name in paths:
        print(f"  {name:16s} {statistics.median(seconds[name]):7.2f} s  {rate[name]:9,.0f} impression-iterations/s")
    kept, zero = paths
    print(f"  ratio (zero / kept): {rate[zero] / rate[kept]:.2f}x; impressions bit-identical: "
          f"{torch.equal(inputs[kept], inputs[zero])}")


if __name__ == "__main__":
    main()
