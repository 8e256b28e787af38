"""Standalone evaluation run for the DDP evaluation test. Lightning's DDP launcher re-runs this script once per
extra rank, so everything happens under ``if __name__ == "__main__"``.

    python evaluate_run.py --out FILE [--devices 2]

Evaluates fixed untrained networks on digits splits of odd sizes (validation 143 images, test 359) in batches
of one, so that two ranks split them 72 + 71 and 180 + 179 and run one batch more or fewer: ``ClassifierModule``
validated, fitted one epoch at learning rate 0 (its validation runs through the DDP-wrapped network) and
tested on the digits module itself, and ``DistillationModule`` tested through an ``ImpressionDataModule``'s
``eval_data`` (nothing is synthesized). Rank 0 writes the logged figures to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args()

    import torch

    from helpers import tiny
    from zskd_lightning import ClassifierModule, DistillationModule
    from zskd_lightning.data import DigitsDataModule

    class OddDigits(DigitsDataModule):
        """Digits with the fixed test split less its last image (359) and a validation split of 143."""

        def __init__(self) -> None:
            super().__init__(batch_size=16, eval_batch_size=1, val_fraction=0.0995)

        def _load_official(self, train: bool):
            images, labels = super()._load_official(train)
            return (images, labels) if train else (images[:-1], labels[:-1])

    def rename(prefix: str, logged: dict) -> dict:
        return {f"{prefix}_{key.replace('/', '_')}": value for key, value in logged.items()}

    torch.set_num_threads(1)
    figures = {}
    root = os.path.dirname(os.path.abspath(args.out))
    trainer = tiny.quiet_trainer(root, devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                                 limit_train_batches=2)
    classifier = ClassifierModule(tiny.make_net(0), optimizer=lambda params: torch.optim.SGD(params, lr=0.0))
    figures.update(rename("classifier_validate", trainer.validate(classifier, datamodule=OddDigits(), verbose=False)[0]))
    trainer.fit(classifier, datamodule=OddDigits())
    figures.update(rename("classifier_fit", {key: float(value) for key, value in trainer.callback_metrics.items()
                                             if key.startswith("val/")}))
    figures.update(rename("classifier", trainer.test(classifier, datamodule=OddDigits(), verbose=False)[0]))
    distillation = DistillationModule(teacher=tiny.make_net(0), student=tiny.make_net(1, width=4),
                                      export_filename=None)
    impressions = tiny.make_datamodule(os.path.join(root, "cache"), eval_data=OddDigits())
    result = trainer.test(distillation, datamodule=impressions, verbose=False)[0]
    figures.update(rename("distillation", result))
    if trainer.global_rank == 0:
        with open(args.out, "w") as handle:
            json.dump(figures, handle)
    print(f"DONE rank={trainer.global_rank}", flush=True)
    from zskd_lightning.ranks import close_process_group

    close_process_group()  # as `zskd` does: gloo's threads left to the exit can abort it


if __name__ == "__main__":
    main()
