"""Wang 2021 on one chunk: does the teacher's argmax on the synthesized impressions agree with the argmax of the
target each was made for, and are the classes balanced? One chunk (256 impressions, seed 0) of
``configs/mnist/wang_lenet5_half.yaml``'s synthesizer per variant, from the table's MNIST teacher; no data read.

    python benchmarks/wang_agreement.py 'paper={"matching_scale": 1.0, "sigma": 1.5}' \\
        'no_activation={"matching_scale": 1.0, "activation_weight": 0.0, "sigma": 1.5}' \\
        't_squared={"sigma": 1.5}' 'config={}'

Each argument is ``name=JSON`` (overrides of the synthesizer's arguments; the config's sigma is 5, the paper's
1.5, hence the override).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from teacher_sources import ROOT, config_synthesizer

from zskd_lightning import FrozenTeacher
from zskd_lightning.models import LeNet5
from zskd_lightning.pixels import InputSpec
from zskd_lightning.synthesis.api import Chunk, SynthesisContext

CONFIG = ROOT / "configs" / "mnist" / "wang_lenet5_half.yaml"
TEACHER = ROOT / "benchmarks" / "teachers" / "mnist_lenet5.safetensors"  # the committed table teacher
MNIST_SPEC = InputSpec((1, 32, 32), (0.1307,), (0.3081,))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", help="name=JSON overrides of the synthesizer's arguments")
    parser.add_argument("--impressions", type=int, default=256)
    args = parser.parse_args(argv)
    teacher = FrozenTeacher(network=LeNet5(1, 10), checkpoint=str(TEACHER))
    print(f"{'variant':<16}{'agreement':>10}{'max p (T=1)':>13}  teacher's classes / targets' classes  seconds")
    for variant in args.variants:
        name, _, overrides = variant.partition("=")
        synthesizer = config_synthesizer(CONFIG, **json.loads(overrides or "{}"))
        context = SynthesisContext(teacher=teacher, input_spec=MNIST_SPEC, num_classes=10, seed=0)
        synthesizer.setup(context)
        started = time.perf_counter()
        result = synthesizer.invert(context, Chunk.of(0, 0, 0, args.impressions))
        with torch.no_grad():
            logits = teacher(result.inputs)
        agreement = (logits.argmax(1) == result.labels).float().mean().item()
        confidence = torch.softmax(logits, 1).max(1).values.mean().item()
        print(f"{name:<16}{100 * agreement:>9.1f}%{confidence:>13.3f}  "
              f"{torch.bincount(logits.argmax(1), minlength=10).tolist()} / "
              f"{torch.bincount(result.labels, minlength=10).tolist()}  {time.perf_counter() - started:.0f}", flush=True)


if __name__ == "__main__":
    main()
