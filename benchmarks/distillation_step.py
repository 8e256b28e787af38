"""What one distillation step of the MNIST pair costs on this machine: the frozen LeNet-5 teacher's forward with
``nn.MaxPool2d(2)`` against :class:`~zskd_lightning.models.MaxPool2x2` (the models' pooling: the same values, a
faster path without autograd), beside the LeNet-5-half student's forward and backward. Prints every figure and
its ratio side by side.

    python benchmarks/distillation_step.py [--batch 256] [--repeats 50]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from timing import seconds_per_call

from zskd_lightning.models import LeNet5, LeNet5Half
from zskd_lightning.models.lenet import MaxPool2x2


def with_plain_pooling(model: nn.Module) -> nn.Module:
    """``model`` with every :class:`MaxPool2x2` replaced by ``nn.MaxPool2d(2)`` (in place)."""
    for name, child in model.named_children():
        if isinstance(child, MaxPool2x2):
            setattr(model, name, nn.MaxPool2d(2))
        else:
            with_plain_pooling(child)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    inputs = torch.randn(args.batch, 1, 32, 32)
    teacher = LeNet5().eval()
    plain = with_plain_pooling(LeNet5().eval())
    plain.load_state_dict(teacher.state_dict())
    student = LeNet5Half()
    with torch.no_grad():
        if not torch.equal(teacher(inputs), plain(inputs)):
            raise SystemExit("MaxPool2x2 and nn.MaxPool2d(2) disagree on the teacher's logits")

    def forward(model):
        def run():
            with torch.no_grad():
                model(inputs)
        return run

    def student_step():
        student.zero_grad(set_to_none=True)
        student(inputs).logsumexp(dim=1).mean().backward()

    figures = {
        "teacher forward, nn.MaxPool2d(2)": seconds_per_call(forward(plain), args.repeats),
        "teacher forward, MaxPool2x2": seconds_per_call(forward(teacher), args.repeats),
        "student forward + backward": seconds_per_call(student_step, args.repeats),
    }
    base = figures["teacher forward, MaxPool2x2"]
    print(f"batch {args.batch} of [1, 32, 32], {torch.get_num_threads()} threads; same logits from both poolings")
    for name, seconds in figures.items():
        print(f"{name:36s} {seconds * 1e3:8.2f} ms   {seconds / base:5.2f}x MaxPool2x2's teacher forward")


if __name__ == "__main__":
    main()
