"""Standalone online-distillation run for the subprocess tests (kill -9 and resume, DDP). Lightning's DDP
launcher re-runs this script once per extra rank, so everything happens under ``if __name__ == "__main__"``.

    python online_run.py --root DIR [--devices 2] [--steps N] [--buffer N] [--slow SECONDS] [--resume]
                         [--stop-at STEP] [--epochs N] [--random] [--fail-at STEP] [--fail-in-round STEP]
                         [--fail-in-transfer STEP] [--resume-from FILE] [--ssdkd] [--interrupt-in-write STEP]
                         [--synthesis-on-trainer] [--batchnorm] [--fail-after-step STEP]

Trains :func:`helpers.tiny.online_setup` (digits input space, tiny teacher and student) for ``--epochs`` epochs
of ``--steps`` steps (``--stop-at`` ends it early, as an interruption would), checkpointing ``last.ckpt`` in
``DIR/checkpoints`` every 2 steps. ``--random`` adds what draws from random streams during training: blends,
turns and noise (``batch_augmentation``) and a dropout layer before the student. ``--fail-at`` raises inside
that global step (after its round and its forward pass), where ``OnExceptionCheckpoint`` writes
``DIR/checkpoints/on_exception.ckpt``; ``--fail-in-round`` raises inside the round of that global step (an even
one: a round every 2 steps), after the generator's update and before the buffer is written;
``--fail-in-transfer`` raises in the datamodule's ``on_after_batch_transfer`` of that global step's batch, after
its augmentation drew and before Lightning counts the batch ready; ``--ssdkd`` makes it SSD-KD's run (its
synthesizer and modulating function, the class-balanced buffer update, priority sampling);
``--interrupt-in-write`` sends this process a SIGINT (Ctrl-C) inside that global step's round, after the buffer's
second write of an input; ``--synthesis-on-trainer`` gives the Trainer the ``OnlineSynthesis`` callback (it then
runs before the module's own callbacks); ``--batchnorm`` puts a BatchNorm layer before the student (the round
reads it in eval mode); ``--fail-after-step`` raises in a Trainer callback's ``on_train_batch_end`` of that global
step (after its optimizer's step, before ``OnlineSynthesis``'s hook); ``--resume-from`` names the checkpoint
``--resume`` reads. At the end of
fit every rank writes ``DIR/rank{r}.pt``: its buffer, labels, generator and student weights, round count and (a
priority sampler) priorities.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--buffer", type=int, default=48, help="the replay buffer's capacity")
    parser.add_argument("--slow", type=float, default=0.0, help="sleep this long after each training step")
    parser.add_argument("--resume", action="store_true", help="resume from DIR/checkpoints/last.ckpt")
    parser.add_argument("--stop-at", type=int, default=-1, help="stop after this many steps (Trainer max_steps)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--random", action="store_true", help="batch augmentation and a student with dropout")
    parser.add_argument("--fail-at", type=int, default=-1, help="raise inside this global step's training step")
    parser.add_argument("--fail-in-round", type=int, default=-1, help="raise inside this global step's round")
    parser.add_argument("--fail-in-transfer", type=int, default=-1,
                        help="raise in on_after_batch_transfer of this global step's batch")
    parser.add_argument("--ssdkd", action="store_true", help="SSD-KD: balanced buffer, priority sampling")
    parser.add_argument("--interrupt-in-write", type=int, default=-1,
                        help="Ctrl-C (SIGINT) inside this global step's buffer write")
    parser.add_argument("--synthesis-on-trainer", action="store_true",
                        help="OnlineSynthesis on the Trainer's callbacks, not the module's")
    parser.add_argument("--resume-from", default="last.ckpt", help="the checkpoint (in DIR/checkpoints) to resume")
    parser.add_argument("--batchnorm", action="store_true", help="a BatchNorm layer before the student")
    parser.add_argument("--fail-after-step", type=int, default=-1,
                        help="raise in a Trainer callback's on_train_batch_end of this global step")
    args = parser.parse_args()

    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint, OnExceptionCheckpoint

    from helpers import tiny

    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)  # the global stream's start (torch's own is drawn at random)
    ssdkd = {}
    if args.ssdkd:
        from zskd_lightning import PrioritySampler, SSDKDSynthesizer

        ssdkd = dict(synthesizer=SSDKDSynthesizer, sampler=PrioritySampler(), buffer_update="balanced")
    model, datamodule = tiny.online_setup(steps_per_epoch=args.steps, buffer_size=args.buffer, **ssdkd)
    if args.ssdkd:
        from zskd_lightning import ModulatingFunction

        model.sample_weights = ModulatingFunction()
    if args.random:
        from zskd_lightning.augment import BatchAugmentation

        datamodule.batch_augmentation = BatchAugmentation(degrees=15, mix=0.5, noise_std=0.05)
        model.student = torch.nn.Sequential(torch.nn.Dropout(0.3), model.student)
    if args.batchnorm:  # running statistics each rank moves with its own batch
        model.student = torch.nn.Sequential(torch.nn.BatchNorm2d(tiny.INPUT_SHAPE[0]), model.student)

    class Slow(Callback):
        def on_train_batch_end(self, *unused) -> None:
            time.sleep(args.slow)

    class FailOnce(Callback):
        def on_before_backward(self, trainer, pl_module, loss) -> None:
            if trainer.global_step == args.fail_at:
                raise RuntimeError("the step failed")

    class FailAfterStep(Callback):  # a Trainer callback: its on_train_batch_end runs before OnlineSynthesis's
        def on_train_batch_end(self, trainer, *unused) -> None:
            if trainer.global_step == args.fail_after_step + 1:  # the step's optimizer has stepped
                raise RuntimeError("the step's end failed")

    class Dump(Callback):
        def on_train_start(self, trainer, pl_module) -> None:  # a resumed fit's first step: the one it resumed at
            print(f"START rank={trainer.global_rank} steps={trainer.global_step}", flush=True)

        def on_train_end(self, trainer, pl_module) -> None:
            state = {"inputs": datamodule.buffer.inputs[: len(datamodule.buffer)],
                     "labels": datamodule.buffer.labels[: len(datamodule.buffer)],
                     "generator": datamodule.synthesizer.generator.state_dict(),
                     "student": pl_module.student.state_dict(),
                     "rounds": next(c for c in trainer.callbacks if type(c).__name__ == "OnlineSynthesis").rounds}
            if getattr(datamodule.sampler, "tree", None) is not None:
                state["priorities"] = torch.from_numpy(datamodule.sampler.tree.values())
            torch.save(state, os.path.join(args.root, f"rank{trainer.global_rank}.pt"))

    if args.fail_in_round >= 0:
        make_round = datamodule.synthesizer.round

        def failing_round(*round_args, **round_kwargs):
            result = make_round(*round_args, **round_kwargs)
            if trainer.global_step == args.fail_in_round:
                raise RuntimeError("the round failed")
            return result

        datamodule.synthesizer.round = failing_round

    if args.fail_in_transfer >= 0:
        transfer = datamodule.on_after_batch_transfer

        def failing_transfer(batch, dataloader_idx):
            batch = transfer(batch, dataloader_idx)
            if trainer.training and trainer.global_step == args.fail_in_transfer:
                raise RuntimeError("the batch transfer failed")
            return batch

        datamodule.on_after_batch_transfer = failing_transfer

    if args.interrupt_in_write >= 0:
        import signal

        # as in a terminal: a process started in the background by a shell without job control ignores SIGINT
        signal.signal(signal.SIGINT, signal.default_int_handler)
        write = datamodule.buffer.replace
        writes = []

        def interrupted_write(*write_args, **write_kwargs):
            write(*write_args, **write_kwargs)
            writes.append(trainer.global_step)
            if writes.count(args.interrupt_in_write) == 2:
                signal.raise_signal(signal.SIGINT)

        datamodule.buffer.replace = interrupted_write

    synthesis = datamodule.synthesis_callbacks() if args.synthesis_on_trainer else []
    folder = os.path.join(args.root, "checkpoints")
    checkpoints = ModelCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=2, save_top_k=0)
    failing = ([FailOnce(), FailAfterStep(), OnExceptionCheckpoint(folder)]
               if max(args.fail_at, args.fail_in_round, args.fail_in_transfer, args.interrupt_in_write,
                      args.fail_after_step) >= 0 else [])
    trainer = tiny.quiet_trainer(args.root, devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                                 enable_checkpointing=True,
                                 callbacks=[checkpoints, Slow(), Dump(), *failing, *synthesis],
                                 max_steps=args.stop_at, max_epochs=args.epochs)
    ckpt = os.path.join(folder, args.resume_from) if args.resume else None
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt)
    print(f"DONE rank={trainer.global_rank} steps={trainer.global_step}", flush=True)
    from zskd_lightning.ranks import close_process_group

    close_process_group()  # as `zskd` does: gloo's threads left to the exit can abort it


if __name__ == "__main__":
    main()
