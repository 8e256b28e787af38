"""Standalone offline-distillation run for the subprocess tests (resume under DDP). Lightning's DDP launcher
re-runs this script once per extra rank, so everything happens under ``if __name__ == "__main__"``.

    python offline_run.py --root DIR [--devices 2] [--stop-at STEP] [--resume] [--nan-on-rank R] [--export-fails]
                          [--test-record-fails]

Distils from a tiny impression cache (``DIR/cache``: 48 impressions; teacher ``make_net(0)``) for 3 epochs of
3 batches per process (8 inputs a batch), with what draws from random streams: a per-sample random affine
transform, batch blends and noise, and a dropout layer before the student. ``--stop-at`` ends it after that
many steps (Trainer max_steps), as an interruption would; ``last.ckpt`` in ``DIR/checkpoints`` is written every
step. At the end of fit every rank writes ``DIR/rank{r}.pt``: its student's weights. ``--nan-on-rank R``: rank
R's student outputs NaN (its loss is not finite from the first step). ``--export-fails``: the student's export at
the end of fit (global rank 0's alone) fails as on a full disk. ``--test-record-fails``: the fit exports the
student, a test follows (16 random inputs) and writing its accuracy into the student's record (global rank 0's
alone) fails; a barrier follows the test.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--resume", action="store_true", help="resume from DIR/checkpoints/last.ckpt")
    parser.add_argument("--stop-at", type=int, default=-1, help="stop after this many steps (Trainer max_steps)")
    parser.add_argument("--nan-on-rank", type=int, default=None, help="this rank's student outputs NaN")
    parser.add_argument("--export-fails", action="store_true", help="the export at the end of fit fails")
    parser.add_argument("--test-record-fails", action="store_true",
                        help="a test after fit; writing its accuracy into the student's record fails")
    args = parser.parse_args()

    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from torch import nn
    from torchvision.transforms import v2

    from helpers import tiny
    from zskd_lightning import DistillationModule
    from zskd_lightning.augment import BatchAugmentation

    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    datamodule = tiny.make_datamodule(os.path.join(args.root, "cache"), num_impressions=48, batch_size=8,
                                      augmentation=v2.RandomAffine(degrees=20),
                                      batch_augmentation=BatchAugmentation(mix=0.5, noise_std=0.05))
    class NanOnRank(nn.Module):
        def forward(self, x):
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            return x * float("nan") if rank == args.nan_on_rank else x

    class Distillation(DistillationModule):
        def export_student(self, path):
            if args.export_fails:
                raise OSError(28, "No space left on device")
            return super().export_student(path)

    model = Distillation(tiny.make_net(0), nn.Sequential(NanOnRank(), nn.Dropout(0.3), tiny.make_net(1, width=4)),
                         export_filename="student.safetensors" if args.export_fails or args.test_record_fails else None)

    class Dump(Callback):
        def on_train_start(self, trainer, pl_module) -> None:  # a resumed fit's first step: the one it resumed at
            print(f"START rank={trainer.global_rank} steps={trainer.global_step}", flush=True)

        def on_train_end(self, trainer, pl_module) -> None:
            torch.save(pl_module.student.state_dict(), os.path.join(args.root, f"rank{trainer.global_rank}.pt"))

    checkpoints = ModelCheckpoint(dirpath=os.path.join(args.root, "checkpoints"), save_last=True,
                                  every_n_train_steps=1, save_top_k=0)
    trainer = tiny.quiet_trainer(args.root, devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                                 enable_checkpointing=True, callbacks=[checkpoints, Dump()], max_steps=args.stop_at,
                                 max_epochs=3)
    ckpt = os.path.join(args.root, "checkpoints", "last.ckpt") if args.resume else None
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt)
    if args.test_record_fails:
        import zskd_lightning.distillation

        def failing_update(*unused, **unused_too):
            raise OSError(28, "No space left on device")

        zskd_lightning.distillation.update_record = failing_update
        inputs = torch.randn(16, *tiny.INPUT_SHAPE, generator=torch.Generator().manual_seed(0))
        tests = torch.utils.data.TensorDataset(inputs, torch.arange(16) % 10)
        trainer.test(model, dataloaders=torch.utils.data.DataLoader(tests, batch_size=8))
        trainer.strategy.barrier()  # the next collective: a rank going on alone would wait here
    print(f"DONE rank={trainer.global_rank} steps={trainer.global_step}", flush=True)
    from zskd_lightning.ranks import close_process_group

    close_process_group()  # as `zskd` does: gloo's threads left to the exit can abort it


if __name__ == "__main__":
    main()
