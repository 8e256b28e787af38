"""Standalone synthesis run for the subprocess tests (kill/resume, DDP). Lightning's DDP launcher re-runs this
script once per extra rank, so everything happens under ``if __name__ == "__main__"``.

    python synthesize_run.py --cache DIR [--devices 2] [--threads 1|default] [--fit] [--slow SECONDS]

Teacher: ``helpers.tiny.make_net(0)`` (fixed-seed init, identical in every process). Each rank appends
``rank chunk threads`` to ``DIR/../ranks.log`` for every chunk it writes. Exit code 0 on success.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--threads", default="default", help="torch threads per process, or 'default'")
    parser.add_argument("--num-impressions", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fit", action="store_true", help="train one epoch after synthesis (else synthesize only)")
    parser.add_argument("--no-grid", action="store_true", help="ImpressionSynthesis(grid_filename=None)")
    parser.add_argument("--slow", type=float, default=0.0, help="sleep this long after writing each chunk")
    args = parser.parse_args()

    import torch

    if args.threads != "default":
        torch.set_num_threads(int(args.threads))

    import lightning as L

    from helpers import tiny
    from zskd_lightning import DistillationModule, ImpressionSynthesis
    from zskd_lightning.synthesis.cache import ImpressionCache

    log_path = os.path.join(os.path.dirname(os.path.abspath(args.cache)), "ranks.log")
    write_chunk = ImpressionCache.write_chunk

    def logged_write_chunk(self, chunk, *rest, **kwargs):
        write_chunk(self, chunk, *rest, **kwargs)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        with open(log_path, "a") as handle:
            handle.write(f"{rank} {chunk} {torch.get_num_threads()}\n")
        if args.slow:
            time.sleep(args.slow)

    ImpressionCache.write_chunk = logged_write_chunk

    teacher = tiny.make_net(0)
    datamodule = tiny.make_datamodule(
        args.cache, teacher, num_impressions=args.num_impressions, chunk_size=args.chunk_size,
        iterations=args.iterations, seed=args.seed,
    )
    model = DistillationModule(teacher=teacher, student=tiny.make_net(1, width=4), export_filename=None)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=1,
        limit_train_batches=None if args.fit else 0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=os.path.dirname(os.path.abspath(args.cache)),
        callbacks=[ImpressionSynthesis(grid_filename=None if args.no_grid else "impressions.png")],
    )
    trainer.fit(model, datamodule=datamodule)
    print(f"DONE rank={trainer.global_rank} threads={torch.get_num_threads()}", flush=True)


if __name__ == "__main__":
    main()
