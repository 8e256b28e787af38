"""Standalone synthesis run for the subprocess tests (kill/resume, DDP). Lightning's DDP launcher re-runs this
script once per extra rank, so everything happens under ``if __name__ == "__main__"``.

    python synthesize_run.py --cache DIR [--devices 2] [--threads N] [--fit] [--export] [--no-grid]
                             [--slow SECONDS] [--fail-rank R] [--fail-identity-rank R]

Runs ``helpers.tiny.run_synthesis`` (the standard tiny cache: teacher ``make_net(0)``, 8 chunks of 8, 5
iterations). Every rank appends ``rank chunk threads=N`` to ``--rank-log`` for each chunk it writes, and
``rank ERROR message`` if fit raises. ``--fail-rank R``: rank R's first chunk write fails as on a full disk;
``--fail-identity-rank R``: rank R cannot derive the cache's identity (as a node lacking a Lopes record).
``--export``: the module exports its student (DistillationModule's default ``export_filename``).
Exit code 0 on success.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", required=True)
    parser.add_argument("--rank-log", default=None, help="default: ranks.log next to the cache folder")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: untouched)")
    parser.add_argument("--fit", action="store_true", help="train one epoch after synthesis (else synthesize only)")
    parser.add_argument("--no-grid", action="store_true", help="ImpressionSynthesis(grid_filename=None)")
    parser.add_argument("--slow", type=float, default=0.0, help="sleep this long after writing each chunk")
    parser.add_argument("--fail-rank", type=int, default=None, help="this rank's chunk writes fail (ENOSPC)")
    parser.add_argument("--fail-identity-rank", type=int, default=None,
                        help="this rank's ImpressionPlan.cache_for fails (a file the identity reads is missing)")
    parser.add_argument("--export", action="store_true", help="export the student after fit (default filename)")
    args = parser.parse_args()

    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from helpers import tiny
    from zskd_lightning.errors import ZSKDError
    from zskd_lightning.impressions.cache import ImpressionCache
    from zskd_lightning.impressions.driver import ImpressionPlan

    log_path = args.rank_log or os.path.join(os.path.dirname(os.path.abspath(args.cache)), "ranks.log")

    def rank() -> int:
        return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    def log(line: str) -> None:
        with open(log_path, "a") as handle:
            handle.write(f"{rank()} {line}\n")

    write_chunk = ImpressionCache.write_chunk

    def logged_write_chunk(self, chunk, *rest, **kwargs):
        if rank() == args.fail_rank:
            raise OSError(errno.ENOSPC, "No space left on device")
        write_chunk(self, chunk, *rest, **kwargs)
        log(f"{chunk} threads={torch.get_num_threads()}")
        if args.slow:
            time.sleep(args.slow)

    ImpressionCache.write_chunk = logged_write_chunk
    cache_for = ImpressionPlan.cache_for

    def failing_cache_for(self, *rest, **kwargs):
        if rank() == args.fail_identity_rank:
            raise ZSKDError("cannot read the metadata file record.json: no such file on this node")
        return cache_for(self, *rest, **kwargs)

    ImpressionPlan.cache_for = failing_cache_for
    try:
        tiny.run_synthesis(args.cache, devices=args.devices, fit=args.fit, grid=not args.no_grid,
                           export_filename="student.safetensors" if args.export else None)
    except Exception as err:
        log(f"ERROR {type(err).__name__}: {str(err).splitlines()[0][:300]}")
        raise
    print(f"DONE rank={rank()} threads={torch.get_num_threads()}", flush=True)
    from zskd_lightning.ranks import close_process_group

    close_process_group()  # as `zskd` does: gloo's threads left to the exit can abort it


if __name__ == "__main__":
    main()
