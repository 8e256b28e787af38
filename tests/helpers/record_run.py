"""Standalone ``ZSKDTrainer.record`` run for the subprocess tests (DDP). Lightning's DDP launcher re-runs this
script once per extra rank, so everything happens under ``if __name__ == "__main__"``.

    python record_run.py --output FILE [--devices 2] [--bad-label-on-rank R]

Records the tiny teacher (``make_net(0)``) over 64 random labelled inputs, 8 a batch. ``--bad-label-on-rank R``:
the samples rank R reads carry the label 99 (outside the teacher's 10 classes). Prints ``DONE rank=r`` at the end.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--bad-label-on-rank", type=int, default=None)
    args = parser.parse_args()

    import lightning as L
    import torch
    from torch.utils.data import DataLoader, Dataset

    from helpers import tiny
    from zskd_lightning.cli import ZSKDTrainer
    from zskd_lightning.metadata.record import ActivationRecorder

    torch.set_num_threads(1)

    class Labelled(Dataset):
        inputs = torch.randn(64, *tiny.INPUT_SHAPE, generator=torch.Generator().manual_seed(0))

        def __len__(self) -> int:
            return len(self.inputs)

        def __getitem__(self, index: int):
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            return self.inputs[index], 99 if rank == args.bad_label_on_rank else index % 10

    class Data(L.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(Labelled(), batch_size=8)

    trainer = ZSKDTrainer(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                          logger=False, enable_progress_bar=False, enable_model_summary=False,
                          default_root_dir=os.path.dirname(args.output))
    trainer.record(ActivationRecorder(tiny.make_net(0), output=args.output), Data())
    print(f"DONE rank={trainer.global_rank}", flush=True)
    from zskd_lightning.ranks import close_process_group

    close_process_group()  # as `zskd` does: gloo's threads left to the exit can abort it


if __name__ == "__main__":
    main()
