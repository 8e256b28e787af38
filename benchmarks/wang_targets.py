"""How confident are Wang 2021's soft targets? The table teacher's logits on Gaussian feature draws (the config's
sampler at several sigmas) beside its logits on real validation images, in the figures that decide what a soft
target at temperature T teaches: the spread of the logits within one input, the largest softmax at T, and how
the argmax classes are shared. Reads the validation split of the real training data (never the test set).

    ZSKD_DATA_ROOT=../shared/data python benchmarks/wang_targets.py --dataset cifar10 --sigmas 2 5 10 20 --draws 5000
    ZSKD_DATA_ROOT=../shared/data python benchmarks/wang_targets.py --dataset mnist --sigmas 1.5 3 5 8
    ZSKD_DATA_ROOT=../shared/data python benchmarks/wang_targets.py --dataset mnist --sigmas 5 10 20 --rectify
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from teacher_sources import ROOT, config_synthesizer, config_teacher

from zskd_lightning.data import CIFAR10DataModule, ClassificationDataModule, MNISTDataModule
from zskd_lightning.pixels import InputSpec
from zskd_lightning.synthesis.api import SynthesisContext

CONFIGS = {"mnist": ROOT / "configs" / "mnist" / "wang_lenet5_half.yaml",
           "cifar10": ROOT / "configs" / "cifar10" / "wang_alexnet_half.yaml"}
DATA = {"mnist": MNISTDataModule, "cifar10": CIFAR10DataModule}


def figures(logits: torch.Tensor, temperature: float) -> str:
    """``logits [N, K]``: mean within-input standard deviation, mean largest softmax at ``temperature``, and the
    smallest and largest share of inputs whose argmax is each class (%)."""
    shares = torch.bincount(logits.argmax(dim=1), minlength=logits.shape[1]).float() / len(logits) * 100
    largest = torch.softmax(logits / temperature, dim=1).max(dim=1).values.mean()
    return f"{logits.std(dim=1).mean():10.2f} {largest:12.3f}  {shares.min():.1f}-{shares.max():.1f}"


def real_logits(teacher: torch.nn.Module, data: ClassificationDataModule) -> torch.Tensor:
    """The teacher's logits ``[N, K]`` on ``data``'s validation split."""
    data.setup("fit")
    with torch.no_grad():
        return torch.cat([teacher(x) for x, _ in data.val_dataloader()])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(CONFIGS), default="cifar10")
    parser.add_argument("--sigmas", nargs="+", type=float, default=[2.0, 5.0, 10.0])
    parser.add_argument("--draws", type=int, default=20000)
    parser.add_argument("--rectify", action="store_true", help="pass the draws through a ReLU (rectify: true)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = CONFIGS[args.dataset]
    teacher = config_teacher(config)
    data = DATA[args.dataset](batch_size=512, val_fraction=0.1, seed=0, augment=False, download=False)  # 10% held out
    context = SynthesisContext(teacher=teacher, input_spec=InputSpec(data.input_shape, data.mean, data.std),
                               num_classes=data.num_classes, seed=0)
    print(f"{args.dataset}: the table teacher of {config.relative_to(ROOT)}; {args.draws:,} draws per sigma")
    print(f"{'source':28s} {'logit s.d.':>10s} {'max softmax':>12s}  classes (% min-max)")
    temperature = None
    for sigma in args.sigmas:
        synthesizer = config_synthesizer(config, sigma=sigma, rectify=args.rectify)
        synthesizer.setup(context)
        sampler = synthesizer.target_sampler
        temperature = sampler.temperature
        rng = np.random.default_rng(0)  # batches of 1,000: the head runs the whole network on stand-in inputs
        logits = torch.cat([sampler.head_logits(min(1000, args.draws - start), rng, context)
                            for start in range(0, args.draws, 1000)])
        source = f"{'rectified' if args.rectify else 'Gaussian'} features, sigma {sigma:g}"
        print(f"{source:28s} {figures(logits, temperature)}")
    print(f"{'real validation images':28s} {figures(real_logits(teacher, data), temperature)}")
    print(f"(max softmax at T = {temperature:g}, the targets' temperature; a uniform target has "
          f"{1 / data.num_classes:.3f})")


if __name__ == "__main__":
    main()
