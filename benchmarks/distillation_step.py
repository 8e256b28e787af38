"""What one distillation step costs on this machine: the frozen teacher's forward beside the student's forward and
backward, with the faster paths the library has for the teacher's layers. Prints every figure and its ratio side
by side.

``--pair mnist``: the LeNet-5 teacher with ``nn.MaxPool2d(2)`` against
:class:`~zskd_lightning.models.lenet.MaxPool2x2` (the models' pooling: the same values, a faster path without autograd),
and as a :class:`~zskd_lightning.FrozenTeacher` (channels-last layout, its default), beside the LeNet-5-half
student. ``--pair cifar10``: the AlexNet teacher as a ``FrozenTeacher`` with the stock ``nn.LocalResponseNorm``
(``fast_kernels=False, channels_last=False``), with the banded LRN
(:class:`~zskd_lightning.kernels.BandLocalResponseNorm`), and with both fast paths (the default); the same logits
up to float rounding; beside the AlexNet-half student.

    python benchmarks/distillation_step.py [--pair mnist] [--batch 256] [--repeats 50]
    python benchmarks/distillation_step.py --pair cifar10 --batch 128 --repeats 5
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from timing import seconds_per_call

from zskd_lightning import FrozenTeacher
from zskd_lightning.models import AlexNet, AlexNetHalf, LeNet5, LeNet5Half
from zskd_lightning.models.lenet import MaxPool2x2


def with_plain_pooling(model: nn.Module) -> nn.Module:
    """``model`` with every :class:`MaxPool2x2` replaced by ``nn.MaxPool2d(2)`` (in place)."""
    for name, child in model.named_children():
        if isinstance(child, MaxPool2x2):
            setattr(model, name, nn.MaxPool2d(2))
        else:
            with_plain_pooling(child)
    return model


def forward(model: nn.Module, inputs: torch.Tensor):
    """A call that runs ``model`` on ``inputs`` without autograd."""
    def run():
        with torch.no_grad():
            model(inputs)
    return run


def training_step(student: nn.Module, inputs: torch.Tensor):
    """A call that runs ``student``'s forward and backward on ``inputs``."""
    def run():
        student.zero_grad(set_to_none=True)
        student(inputs).logsumexp(dim=1).mean().backward()
    return run


def mnist_figures(batch: int, repeats: int) -> tuple[str, dict[str, float], str]:
    """LeNet-5 teacher with either pooling, and as a FrozenTeacher; LeNet-5-half student (seconds per call)."""
    inputs = torch.randn(batch, 1, 32, 32)
    teacher = LeNet5().eval()
    plain = with_plain_pooling(LeNet5().eval())
    plain.load_state_dict(teacher.state_dict())
    frozen = FrozenTeacher(network=LeNet5())
    frozen.network.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        if not torch.equal(teacher(inputs), plain(inputs)):
            raise SystemExit("MaxPool2x2 and nn.MaxPool2d(2) disagree on the teacher's logits")
        gap = (frozen(inputs) - teacher(inputs)).abs().max().item()
    figures = seconds_per_call({
        "teacher forward, nn.MaxPool2d(2)": forward(plain, inputs),
        "teacher forward, MaxPool2x2": forward(teacher, inputs),
        "teacher forward, FrozenTeacher (channels-last)": forward(frozen, inputs),
        "student forward + backward": training_step(LeNet5Half(), inputs),
    }, repeats)
    shape = f"[1, 32, 32]; same logits from both poolings, FrozenTeacher's within {gap:.1e}"
    return shape, figures, "teacher forward, MaxPool2x2"


def cifar10_figures(batch: int, repeats: int) -> tuple[str, dict[str, float], str]:
    """AlexNet teacher with the stock LRN, the banded LRN, and the banded LRN on channels-last (the FrozenTeacher
    default); AlexNet-half student (seconds per call)."""
    inputs = torch.randn(batch, 3, 32, 32)
    network = AlexNet(in_channels=3, num_classes=10)
    teachers = {
        "teacher forward, nn.LocalResponseNorm": dict(fast_kernels=False, channels_last=False),
        "teacher forward, banded LRN": dict(fast_kernels=True, channels_last=False),
        "teacher forward, banded LRN, channels-last": dict(fast_kernels=True, channels_last=True),
    }
    calls, logits = {}, []
    for name, options in teachers.items():
        teacher = FrozenTeacher(network=AlexNet(in_channels=3, num_classes=10), **options)
        teacher.network.load_state_dict(network.state_dict())
        with torch.no_grad():
            logits.append(teacher(inputs))
        calls[name] = forward(teacher, inputs)
    calls["student forward + backward"] = training_step(AlexNetHalf(3, 10), inputs)
    figures = seconds_per_call(calls, repeats)
    gaps = [(logits[0] - fast).abs().max().item() for fast in logits[1:]]
    shape = f"[3, 32, 32]; logits differ from the stock LRN's by at most {gaps[0]:.1e} (banded), {gaps[1]:.1e} " \
            "(banded, channels-last)"
    return shape, figures, "teacher forward, nn.LocalResponseNorm"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=["mnist", "cifar10"], default="mnist")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    measure = mnist_figures if args.pair == "mnist" else cifar10_figures
    shape, figures, base_name = measure(args.batch, args.repeats)
    base = figures[base_name]
    print(f"batch {args.batch} of {shape}; {torch.get_num_threads()} threads")
    for name, seconds in figures.items():
        print(f"{name:44s} {seconds * 1e3:8.2f} ms   {seconds / base:5.2f}x the {base_name}")


if __name__ == "__main__":
    main()
