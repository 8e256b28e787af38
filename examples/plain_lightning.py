"""Data-free knowledge distillation from your own Lightning code: no CLI, no YAML.

1. Train a small teacher on scikit-learn's 8x8 digits (any classifier nn.Module will do).
2. Synthesize ZSKD Data Impressions from the frozen teacher into an on-disk cache.
3. Distil a half-width student on the impressions alone, and test it on the real digits test split.

    python examples/plain_lightning.py                      # about 1-2 minutes on 2 CPU cores
    python examples/plain_lightning.py --impressions 200 --iterations 20 --epochs 2   # a smoke test
"""

from __future__ import annotations

import argparse
import os

import lightning as L
from torch import nn

from zskd_lightning import ClassifierModule, DistillationModule, ImpressionDataModule, ZSKDSynthesizer
from zskd_lightning.data import DigitsDataModule


def conv_net(width: int) -> nn.Module:
    """``[B, 1, 8, 8]`` -> logits ``[B, 10]``. The last ``nn.Linear`` is the classifier (ZSKD reads its weights)."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * 4 * 4, 4 * width), nn.ReLU(),
        nn.Linear(4 * width, 10),
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impressions", type=int, default=2000, help="number of Data Impressions to synthesize")
    parser.add_argument("--iterations", type=int, default=200, help="optimization steps per impression")
    parser.add_argument("--epochs", type=int, default=30, help="distillation epochs")
    parser.add_argument("--teacher-epochs", type=int, default=10, help="teacher training epochs on real digits")
    parser.add_argument("--out", default="runs/plain_lightning", help="folder for the impression cache and logs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    L.seed_everything(args.seed, verbose=False)
    quiet = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False)

    # 1. A teacher trained on real data: the only time real training images are used.
    teacher = conv_net(width=32)
    L.Trainer(max_epochs=args.teacher_epochs, default_root_dir=os.path.join(args.out, "teacher"), **quiet).fit(
        ClassifierModule(teacher), datamodule=DigitsDataModule(batch_size=64)
    )

    # 2. Impressions of the frozen teacher: made from the DistillationModule's teacher when fit starts (the data
    #    asks for its synthesis callback itself), cached in cache_dir and reused by later runs with the same
    #    teacher and settings. eval_data supplies the input shape, the normalization (impressions stay in the
    #    valid pixel range) and the TEST split only.
    data = ImpressionDataModule(
        synthesizer=ZSKDSynthesizer(betas=(1.0, 0.1), temperature=20.0, iterations=args.iterations, lr=0.05),
        num_impressions=args.impressions,
        cache_dir=os.path.join(args.out, "impressions"),
        eval_data=DigitsDataModule(),
        chunk_size=200,
        batch_size=64,
        overwrite_cache=True,  # the teacher is retrained on every run: replace a cache made by another one
    )

    # 3. Distillation on impressions, then the student's accuracy on the real test split.
    model = DistillationModule(teacher=teacher, student=conv_net(width=16), temperature=20.0)
    trainer = L.Trainer(max_epochs=args.epochs, default_root_dir=args.out, **quiet)
    trainer.fit(model, datamodule=data)
    (results,) = trainer.test(model, datamodule=data, verbose=False)
    print(f"student test accuracy: {results['test/acc']:.3f}   teacher: {results['test/teacher_acc']:.3f}   "
          f"(trained on {args.impressions} impressions, no real training data)")
    return results


if __name__ == "__main__":
    main()
