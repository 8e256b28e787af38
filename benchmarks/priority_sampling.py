"""SSD-KD's priority sampler at scale: drawing a batch of 256 from a 50,000-entry buffer (goal: under 1 ms), and
refreshing the batch's priorities, against uniform draws and against a plain ``torch.multinomial`` over all
priorities. Prints every figure and its ratio side by side.

    python benchmarks/priority_sampling.py [--size 50000] [--batch 256] [--repeats 2000]
"""

from __future__ import annotations

import argparse

import torch

from timing import seconds_per_call

from zskd_lightning.online import PrioritySampler, UniformSampler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=50_000, help="buffer entries")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    priority = PrioritySampler()
    priority.setup(args.size)
    priority.update(torch.arange(args.size), torch.rand(args.size, generator=generator) * 5)
    uniform = UniformSampler()
    losses = torch.rand(args.batch, generator=generator)
    weights = torch.from_numpy(priority.tree.values()).float()

    def multinomial():
        torch.multinomial(weights, args.batch, replacement=True, generator=generator)

    def draw_and_update():
        slots, _ = priority.draw(args.size, args.batch, generator)
        priority.update(slots, losses)

    figures = seconds_per_call({
        "uniform draw": lambda: uniform.draw(args.size, args.batch, generator),
        "priority draw (sum tree) + weights": lambda: priority.draw(args.size, args.batch, generator),
        "priority draw + update": draw_and_update,
        "torch.multinomial over all priorities": multinomial,
    }, args.repeats)
    base = figures["priority draw (sum tree) + weights"]
    print(f"buffer {args.size:,} entries, batch {args.batch}, 1 thread")
    print(f"{'path':<40} {'time (us)':>10} {'x sum-tree draw':>16}")
    for name, seconds in figures.items():
        print(f"{name:<40} {seconds * 1e6:>10.1f} {seconds / base:>16.2f}")
    verdict = "meets" if base < 1e-3 else "misses"
    print(f"goal: a priority draw under 1 ms: {base * 1e3:.3f} ms ({verdict} it)")


if __name__ == "__main__":
    main()
