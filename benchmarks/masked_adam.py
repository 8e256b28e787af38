"""The inversion loop's optimizer: ``_MaskedAdam`` (per-row Adam, so rows that stop early keep their values and
moments) against ``torch.optim.Adam`` (foreach) plus a clamp, on the same tensor. Prints both step times and their
ratio, side by side, and whether the two give the same inputs when every row is active.

    python benchmarks/masked_adam.py [--rows 256] [--steps 500]
"""

from __future__ import annotations

import argparse

import torch

from timing import seconds_per_call

from zskd_lightning.synthesis.inversion import _MaskedAdam


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256, help="impressions per chunk")
    parser.add_argument("--shape", type=int, nargs=3, default=[1, 32, 32])
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(args.rows, *args.shape, generator=generator)
    grad = torch.randn(args.rows, *args.shape, generator=generator)
    low, high = torch.full((args.shape[0], 1, 1), -0.5), torch.full((args.shape[0], 1, 1), 2.8)
    everyone = torch.arange(args.rows)

    masked_inputs = start.clone()
    masked = _MaskedAdam(masked_inputs, 0.05, (low, high))
    torch_inputs = start.clone().requires_grad_(True)
    reference = torch.optim.Adam([torch_inputs], lr=0.05, foreach=True)

    def masked_step() -> None:
        masked.step(everyone, None, grad, everyone=True)

    def torch_step() -> None:
        torch_inputs.grad = grad
        reference.step()
        with torch.no_grad():
            torch_inputs.clamp_(min=low, max=high)

    for _ in range(20):
        masked_step()
        torch_step()
    same = torch.allclose(masked_inputs, torch_inputs.detach(), atol=1e-5)
    timed = seconds_per_call({"masked": masked_step, "torch": torch_step}, args.steps, runs=3)
    t_masked, t_torch = timed["masked"], timed["torch"]
    print(f"rows {args.rows} x {tuple(args.shape)}, {torch.get_num_threads()} thread(s)")
    print(f"{'optimizer':<28}{'us/step':>10}{'ratio':>8}")
    print(f"{'_MaskedAdam':<28}{t_masked * 1e6:>10.1f}{t_masked / t_torch:>8.2f}")
    print(f"{'torch.optim.Adam + clamp':<28}{t_torch * 1e6:>10.1f}{1.0:>8.2f}")
    print(f"same inputs after 20 steps: {same}")


if __name__ == "__main__":
    main()
