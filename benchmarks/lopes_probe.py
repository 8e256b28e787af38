"""A first look at Lopes et al. 2017's objectives on MNIST, judged on the validation split (never the test set):
for each objective, 2,000 impressions from ``configs/mnist/lopes_lenet5_half.yaml``'s synthesizer with a short
schedule, and a LeNet-5-half student distilled on them as ``benchmarks/teacher_sources.py`` does. Needs the
committed teacher's metadata (``configs/mnist/lopes_record.yaml``).

    ZSKD_DATA_ROOT=../shared/data python benchmarks/lopes_probe.py --objectives spectral_layer_pairs --iterations 300
"""

from __future__ import annotations

import argparse
import time

from teacher_sources import ROOT, config_synthesizer, distil_student

CONFIG = ROOT / "configs" / "mnist" / "lopes_lenet5_half.yaml"
TEACHER = ROOT / "benchmarks" / "teachers" / "mnist_lenet5.safetensors"  # the committed table teacher


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objectives", nargs="+", default=["spectral_layer_pairs"],
                        choices=["top_layer", "all_layers", "spectral_all_layers", "spectral_layer_pairs"])
    parser.add_argument("--impressions", type=int, default=2000)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--student-epochs", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for objective in args.objectives:
        started = time.perf_counter()
        synthesizer = config_synthesizer(CONFIG, objective=objective, iterations=args.iterations)
        accuracy = distil_student(TEACHER, args.impressions, 0, args.student_epochs,
                                  ROOT / "runs" / "lopes_probe" / f"{objective}_{args.iterations}_s{args.seed}",
                                  synthesizer=synthesizer, seed=args.seed)
        print(f"{objective}: student {accuracy:.2f}% (validation split) in {time.perf_counter() - started:.0f} s",
              flush=True)


if __name__ == "__main__":
    main()
