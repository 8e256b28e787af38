"""Training order and per-sample draws keyed by (fit seed, epoch, index): resumes at an epoch's end are exact
for offline impressions and real data, as for replay batches (tests/test_online.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import tiny
from helpers.tiny import one_torch_thread  # noqa: F401  (module-wide autouse fixture)
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from torch import nn
from torch.utils.data import TensorDataset
from torchvision.transforms import v2

from zskd_lightning import ClassifierModule, DistillationModule, ResumedRandomStreams
from zskd_lightning.augment import BatchAugmentation
from zskd_lightning.data import DigitsDataModule
from zskd_lightning.data.classification import InMemoryImageDataset, draws_per_item
from zskd_lightning.data.epoch_order import (
    EpochKeyedDataset,
    EpochKeyedLoader,
    EpochKeyedSampler,
    epoch_keyed_loader,
    process_share,
)


class NoisyItems(torch.utils.data.Dataset):
    """Item i: ``i`` plus fresh noise from torch's global stream (a random per-sample transform)."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> torch.Tensor:
        return index + torch.rand(())


def test_an_epochs_order_is_a_function_of_seed_and_epoch_and_ranks_share_it():
    data = TensorDataset(torch.arange(10))
    keys = lambda **kw: list(EpochKeyedSampler(data, seed=7, **kw))  # noqa: E731
    assert keys(epoch=3) == keys(epoch=3)
    assert all(epoch == 3 for epoch, _ in keys(epoch=3))
    assert sorted(i for _, i in keys(epoch=3)) == list(range(10))  # a permutation
    assert [i for _, i in keys(epoch=3)] != [i for _, i in keys(epoch=4)]
    assert [i for _, i in keys(epoch=3)] != [i for _, i in list(EpochKeyedSampler(data, seed=8, epoch=3))]
    sampler = EpochKeyedSampler(data, seed=7)
    sampler.set_epoch(3)  # what Lightning does at an epoch's start
    assert list(sampler) == keys(epoch=3)
    # two ranks split the epoch's permutation between them
    shares = [keys(epoch=3, rank=r, world_size=2) for r in (0, 1)]
    assert sorted(i for share in shares for _, i in share) == list(range(10))
    interleaved = [key for pair in zip(*shares) for key in pair]
    assert interleaved == keys(epoch=3)
    assert len(list(EpochKeyedSampler(data, seed=2**64 - 1, epoch=5))) == 10  # torch.initial_seed is 64-bit


def test_random_items_are_keyed_and_leave_the_global_stream_alone():
    keyed = EpochKeyedDataset(NoisyItems(), seed=7, random_items=True)
    stream = torch.get_rng_state()
    first = keyed[(0, 4)]
    assert torch.equal(torch.get_rng_state(), stream)
    torch.rand(5)
    assert torch.equal(keyed[(0, 4)], first)  # whenever it is computed
    assert not torch.equal(keyed[(1, 4)], first) and not torch.equal(keyed[(0, 5)] - 1, first)
    assert int(keyed[(0, 4)]) == 4 and len(keyed) == 10
    plain = EpochKeyedDataset(NoisyItems(), seed=7, random_items=False)
    torch.manual_seed(0)
    a = plain[(0, 4)]
    torch.manual_seed(0)
    assert torch.equal(plain[(9, 4)], a)  # not reseeded: draws as the dataset would
    assert int(keyed[3]) == 3  # a plain index (an evaluation loader over the same dataset)
    assert int(keyed[np.int64(3)]) == 3 and int(keyed[torch.tensor(3)]) == 3


def test_loader_workers_change_nothing():
    def batches(workers: int) -> list[torch.Tensor]:
        loader = epoch_keyed_loader(NoisyItems(), seed=11, trainer=None, batch_size=4, random_items=True,
                                    num_workers=workers)
        return list(loader)

    stream = torch.get_rng_state()
    in_process = batches(0)
    assert torch.equal(torch.get_rng_state(), stream)  # no draw from the global stream, not even a worker seed
    in_workers = batches(2)
    assert all(torch.equal(a, b) for a, b in zip(in_process, in_workers, strict=True))


def test_a_loader_resumes_after_the_batches_served_and_counted_by_the_trainer():
    data = TensorDataset(torch.arange(10))

    def loader(done=None) -> EpochKeyedLoader:
        sampler = EpochKeyedSampler(data, seed=3, epoch=2)
        return EpochKeyedLoader(EpochKeyedDataset(data, 3, False), batch_size=3, sampler=sampler, batches_done=done)

    whole = [b[0] for b in loader()]
    stopped = loader()
    iterator = iter(stopped)
    next(iterator), next(iterator)
    state = stopped.state_dict()
    assert state == {"epoch": 2, "batches": 2, "world_size": 1, "batch_size": 3, "length": 10}
    resumed = loader()
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b[0]) for a, b in zip(whole[2:], resumed, strict=True))
    resumed = loader(done=lambda: 1)  # a checkpoint saved inside step 2: the Trainer redoes that batch
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b[0]) for a, b in zip(whole[1:], resumed, strict=True))
    other_epoch = loader()
    other_epoch.load_state_dict({"epoch": 1, "batches": 2})  # the state of an epoch that has ended
    assert len(list(other_epoch)) == 4
    old_checkpoint = loader(done=lambda: 2)  # mid-epoch by the Trainer's count, no loader state: said so
    with pytest.warns(UserWarning, match="resumed 2 batches into epoch 2 from a checkpoint without this loader's"):
        assert len(list(old_checkpoint)) == 4


@pytest.mark.parametrize("before, after", [((2, 4), (1, 8)), ((1, 6), (2, 3)), ((2, 3), (3, 2))])
def test_a_mid_epoch_resume_on_another_share_of_the_same_step_reads_the_rest_of_the_epoch_once(before, after):
    """``(world_size, batch_size)`` before and after the resume, ``world_size * batch_size`` the same: the resumed
    ranks read the samples the stopped ones had not, each once (padding repeats only to even out the ranks), in
    as many batches as Lightning, which keeps its count of the epoch's batches, still expects; a second resume
    from the resumed run's state goes on from there."""
    data = TensorDataset(torch.arange(30))

    def loaders(world_size: int, batch_size: int, done=None) -> list[EpochKeyedLoader]:
        return [EpochKeyedLoader(EpochKeyedDataset(data, 3, False), batch_size=batch_size, batches_done=done,
                                 sampler=EpochKeyedSampler(data, seed=3, epoch=1, rank=r, world_size=world_size))
                for r in range(world_size)]

    stopped = loaders(*before)
    read = []
    for loader in stopped:
        iterator = iter(loader)
        read += [int(i) for _ in range(2) for i in next(iterator)[0]]
    state = stopped[0].state_dict()
    assert state == {"epoch": 1, "batches": 2, "world_size": before[0], "batch_size": before[1], "length": 30}
    resumed, rest = loaders(*after, done=lambda: 2), []
    for loader in resumed:
        loader.load_state_dict(state)
        iterator = iter(loader)
        rest.append([int(i) for i in next(iterator)[0]])  # one batch, then a second resume
    again = loaders(*after, done=lambda: 3)
    for loader, share in zip(again, rest):
        loader.load_state_dict(resumed[0].state_dict())
        batches = [[int(i) for i in batch[0]] for batch in loader]
        assert 1 + len(batches) == len(loader) - 2  # the batches Lightning runs after its count of 2
        share += [i for batch in batches for i in batch]
    every = read + [i for share in rest for i in share]
    assert sorted(set(every)) == list(range(30)) and len(every) - 30 < after[0]


@pytest.mark.parametrize("saved", [{"world_size": 1, "batch_size": 5, "length": 20},
                                   {"world_size": 1, "batch_size": 4, "length": 30}])
def test_a_mid_epoch_resume_of_another_step_or_dataset_length_warns_and_keeps_the_count(saved):
    data = TensorDataset(torch.arange(20))
    loader = EpochKeyedLoader(EpochKeyedDataset(data, 3, False), batch_size=4,
                              sampler=EpochKeyedSampler(data, seed=3, epoch=1), batches_done=lambda: 2)
    loader.load_state_dict({"epoch": 1, "batches": 2, **saved})
    with pytest.warns(UserWarning, match=rf"resumed 2 batches into epoch 1 with 1 x 4 samples a step over 20, the "
                                         rf"checkpoint's epoch read 1 x {saved['batch_size']} over {saved['length']}: "
                                         "the rest of this epoch may read some samples twice"):
        assert len(list(loader)) == len(loader) - 2


def test_a_checkpoint_saved_after_a_resume_and_before_a_batch_keeps_the_position():
    """A resumed fit may save before it reads a training batch (the end of a mid-epoch validation it re-runs
    first): that checkpoint holds the restored position (capped at the Trainer's count), so resuming from it
    again starts where the first resume would have, not at the epoch's start."""
    data = TensorDataset(torch.arange(10))

    def loader(done=None) -> EpochKeyedLoader:
        sampler = EpochKeyedSampler(data, seed=3, epoch=2)
        return EpochKeyedLoader(EpochKeyedDataset(data, 3, False), batch_size=3, sampler=sampler, batches_done=done)

    whole = [b[0] for b in loader()]
    first_resume = loader(done=lambda: 2)
    first_resume.load_state_dict({"epoch": 2, "batches": 2})
    saved = first_resume.state_dict()  # no batch read yet
    assert saved == {"epoch": 2, "batches": 2}  # as loaded
    second_resume = loader(done=lambda: 2)
    second_resume.load_state_dict(saved)
    assert all(torch.equal(a, b[0]) for a, b in zip(whole[2:], second_resume, strict=True))
    inside_a_step = loader(done=lambda: 1)  # saved inside step 2: the Trainer counts 1 done and redoes the other
    inside_a_step.load_state_dict({"epoch": 2, "batches": 2})
    assert inside_a_step.state_dict() == {"epoch": 2, "batches": 1}


def test_impressions_of_a_ddp_rank_fill_one_batch_when_its_share_is_under_a_batch(tmp_path):
    """24 impressions over 2 processes: 12 a rank, under a batch of 16. The partial batch is kept (``drop_last``
    judges the rank's share, not the whole set, which would leave each rank no batch at all)."""
    _, datamodule = tiny.run_synthesis(tmp_path / "cache", num_impressions=24, grid=False)
    datamodule.trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False,
                                   enable_checkpointing=False, enable_progress_bar=False)
    assert [len(batch[0]) for batch in datamodule.train_dataloader()] == [12]


@pytest.mark.parametrize("use_distributed_sampler, share", [(True, (0, 2)), (False, (0, 1))])
def test_a_ddp_trainer_shards_the_keyed_loader_as_lightning_would(use_distributed_sampler, share):
    """Rank 0 of two reads half of each epoch; with ``use_distributed_sampler=False`` (Lightning then leaves a
    plain loader whole on every rank) it reads all of it."""
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", use_distributed_sampler=use_distributed_sampler,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert process_share(trainer) == share
    loader = epoch_keyed_loader(TensorDataset(torch.arange(10)), seed=1, trainer=trainer, batch_size=1,
                                random_items=False)
    assert len(list(loader)) == 10 // share[1]


def test_a_loader_made_without_a_trainer_takes_the_process_groups_share(monkeypatch):
    assert process_share(None) == (0, 1)  # no process group
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    assert process_share(None) == (1, 2)
    loader = epoch_keyed_loader(TensorDataset(torch.arange(10)), seed=1, trainer=None, batch_size=10,
                                random_items=False)
    (indices,) = next(iter(loader))
    assert indices.tolist() == [i for _, i in EpochKeyedSampler(TensorDataset(torch.arange(10)), seed=1, rank=1,
                                                                 world_size=2)]


def test_only_datasets_known_not_to_draw_skip_the_per_item_seeding():
    images, labels = torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.int64)
    assert not draws_per_item(InMemoryImageDataset(images, labels))
    assert draws_per_item(InMemoryImageDataset(images, labels, transform=v2.RandomHorizontalFlip()))
    assert draws_per_item(NoisyItems())  # draws in __getitem__, no .transform
    assert draws_per_item(torch.utils.data.Subset(InMemoryImageDataset(images, labels), [0, 1]))


def test_lightning_rebuilding_the_loader_around_its_own_sampler_still_trains(tmp_path):
    model = ClassifierModule(tiny.make_net(1))
    trainer = tiny.quiet_trainer(tmp_path, overfit_batches=2, max_epochs=2)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=16))
    assert trainer.global_step == 4


# where a run is stopped: after epoch 1 by max_epochs (checkpoint at the epoch's end), after step 3 by max_steps
# (checkpoint at the epoch's last batch), after step 4 (mid-epoch); 3 batches an epoch, 3 epochs in all
STOPS = [("epochs", 1), ("steps", 3), ("steps", 4)]


def assert_resumed_ends_as_whole(fit, tmp_path, stop: tuple[str, int]) -> None:
    """``fit(root, limits, ckpt_path, checkpoint)`` (a new module and data, as a new process would make; returns
    the student's weights and checks the steps it took) run whole for 3 epochs, and stopped at ``stop`` then
    resumed from its last checkpoint in a new Trainer: the weights end equal, bit for bit."""
    root = tmp_path / "whole"
    whole = fit(root, {"max_epochs": 3}, None, ModelCheckpoint(dirpath=root / "ckpt", save_top_k=0))
    root = tmp_path / "split"
    kind, at = stop
    every = {"every_n_epochs": 1} if kind == "epochs" else {"every_n_train_steps": 1}
    checkpoint = lambda: ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0, **every)  # noqa: E731
    fit(root, {"max_epochs": at} if kind == "epochs" else {"max_epochs": 3, "max_steps": at}, None, checkpoint())
    split = fit(root, {"max_epochs": 3}, root / "ckpt" / "last.ckpt", checkpoint())
    assert all(torch.equal(split[k], v) for k, v in whole.items())


@pytest.mark.parametrize("stop, workers", [(stop, 0) for stop in STOPS] + [(("steps", 4), 2)],
                         ids=["epochs1", "steps3", "steps4", "steps4-workers2"])
def test_real_data_resumed_trains_as_if_never_stopped(tmp_path, stop, workers):
    """Digits with augmentation, a dropout network: the training order, the augmentation and the dropout all
    draw from streams that a resume restores or re-derives; the weights end equal, bit for bit."""

    def fit(root, limits, ckpt_path, checkpoint):
        L.seed_everything(0, verbose=False)
        model = ClassifierModule(nn.Sequential(nn.Dropout(0.3), tiny.make_net(1)))
        trainer = tiny.quiet_trainer(root, limit_train_batches=3, limit_val_batches=0, enable_checkpointing=True,
                                     callbacks=[checkpoint], **limits)
        data = DigitsDataModule(batch_size=16, augment=True, num_workers=workers)
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
        assert trainer.global_step == limits.get("max_steps", 3 * limits["max_epochs"])
        return {k: v.clone() for k, v in model.network.state_dict().items()}

    assert_resumed_ends_as_whole(fit, tmp_path, stop)


@pytest.mark.parametrize("stop", STOPS, ids=lambda s: f"{s[0]}{s[1]}")
def test_impressions_resumed_distil_as_if_never_stopped(tmp_path, stop):
    """Offline impressions with a per-sample transform, batch blends and a dropout student (one cache, made by
    the first fit and reused): stopped and resumed, the student ends as the unstopped one."""
    cache = tmp_path / "cache"

    def fit(root, limits, ckpt_path, checkpoint):
        L.seed_everything(0, verbose=False)
        datamodule = tiny.make_datamodule(cache, num_impressions=48, augmentation=v2.RandomAffine(degrees=20),
                                          batch_augmentation=BatchAugmentation(mix=0.5, noise_std=0.05))
        model = DistillationModule(tiny.make_net(0), nn.Sequential(nn.Dropout(0.3), tiny.make_net(1, width=4)),
                                   export_filename=None)
        trainer = tiny.quiet_trainer(root, enable_checkpointing=True, callbacks=[checkpoint], **limits)
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        assert trainer.global_step == limits.get("max_steps", 3 * limits["max_epochs"])
        return {k: v.clone() for k, v in model.student.state_dict().items()}

    assert_resumed_ends_as_whole(fit, tmp_path, stop)


class FailsOnce:
    """Mixin: the training step of global step ``fail_at`` raises after its forward pass has drawn (dropout)."""

    fail_at: int | None = None

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_step == self.fail_at:
            raise RuntimeError("the step failed")
        return loss


class FailingClassifier(FailsOnce, ClassifierModule):
    pass


class FailingDistillation(FailsOnce, DistillationModule):
    pass


@pytest.mark.parametrize("where", ["step", "transfer"])
@pytest.mark.parametrize("data", ["real", "impressions"])
def test_a_checkpoint_saved_inside_a_failed_step_resumes_as_if_never_stopped(tmp_path, data, where):
    """``OnExceptionCheckpoint`` saves inside step 4 (the second epoch's second batch), after that batch's
    augmentation and dropout have drawn, or in its transfer hooks after its augmentation drew (before Lightning
    counts the batch ready). The resumed fit redoes the batch with the draws the unstopped run made (the
    augmentation count and global streams of the batch's start, not of the failed step): the weights end equal,
    bit for bit."""
    cache = tmp_path / "cache"

    def fit(root, fail_at, ckpt_path):
        L.seed_everything(0, verbose=False)
        if data == "real":
            model = FailingClassifier(nn.Sequential(nn.Dropout(0.3), tiny.make_net(1)))
            datamodule = DigitsDataModule(batch_size=16, augment=True)
        else:
            model = FailingDistillation(tiny.make_net(0), nn.Sequential(nn.Dropout(0.3), tiny.make_net(1, width=4)),
                                        export_filename=None)
            datamodule = tiny.make_datamodule(cache, num_impressions=48, augmentation=v2.RandomAffine(degrees=20),
                                              batch_augmentation=BatchAugmentation(mix=0.5, noise_std=0.05))
        model.fail_at = fail_at if where == "step" else None
        trainer = tiny.quiet_trainer(root, limit_train_batches=3, limit_val_batches=0, max_epochs=3,
                                     enable_checkpointing=True, callbacks=[OnExceptionCheckpoint(root)])
        if where == "transfer" and fail_at is not None:
            transfer = datamodule.on_after_batch_transfer

            def failing_transfer(batch, dataloader_idx):
                batch = transfer(batch, dataloader_idx)
                if trainer.training and trainer.global_step == fail_at:
                    raise RuntimeError("the step failed")
                return batch

            datamodule.on_after_batch_transfer = failing_transfer
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        assert trainer.global_step == 9
        network = model.network if data == "real" else model.student
        return {k: v.clone() for k, v in network.state_dict().items()}

    whole = fit(tmp_path / "whole", None, None)
    with pytest.raises(RuntimeError, match="the step failed"):
        fit(tmp_path / "split", 4, None)
    split = fit(tmp_path / "split", None, tmp_path / "split" / "on_exception.ckpt")
    assert all(torch.equal(split[k], v) for k, v in whole.items())


def test_a_trainer_with_its_own_random_streams_callback_gets_no_second_one(tmp_path):
    own = ResumedRandomStreams()
    model = ClassifierModule(tiny.make_net(1))
    trainer = tiny.quiet_trainer(tmp_path, limit_train_batches=1, limit_val_batches=0, callbacks=[own])
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=16))
    assert [c for c in trainer.callbacks if isinstance(c, ResumedRandomStreams)] == [own]


@pytest.mark.parametrize("module", ["classifier", "distillation"])
def test_modules_add_the_random_streams_callback(tmp_path, module):
    model = (ClassifierModule(tiny.make_net(1)) if module == "classifier" else
             DistillationModule(tiny.make_net(0), tiny.make_net(1, width=4), export_filename=None))
    trainer = tiny.quiet_trainer(tmp_path, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=16))
    assert sum(isinstance(c, ResumedRandomStreams) for c in trainer.callbacks) == 1


def test_two_processes_resumed_mid_epoch_distil_as_if_never_stopped(tmp_path):
    """Under DDP each rank reads its share of the epoch's keyed order; the loader's state (epoch, batches served)
    is the same on every rank, so rank 0's, the one Lightning saves, resumes both. Stopped at step 5 of 9 (the
    second epoch's second batch) and resumed, both ranks end with the unstopped run's student."""
    script = Path(__file__).parent / "helpers" / "offline_run.py"
    whole, split = tmp_path / "whole", tmp_path / "split"
    outputs = []
    for root, args in ((whole, ()), (split, ("--stop-at", "5")), (split, ("--resume",))):
        root.mkdir(exist_ok=True)
        proc = subprocess.run([sys.executable, str(script), "--root", str(root), "--devices", "2", *args],
                              capture_output=True, text=True, timeout=240, env=tiny.script_env(1))
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append(proc.stdout)
    assert "DONE rank=0 steps=5" in outputs[1] and "DONE rank=1 steps=5" in outputs[1]  # it did stop there
    assert "START rank=0 steps=5" in outputs[2] and "START rank=1 steps=5" in outputs[2]  # and resumed there
    assert "DONE rank=0 steps=9" in outputs[2]
    for rank in (0, 1):
        expected, resumed = (torch.load(root / f"rank{rank}.pt", weights_only=True) for root in (whole, split))
        assert all(torch.equal(resumed[k], v) for k, v in expected.items()), rank


def test_a_loss_that_is_not_finite_on_one_rank_stops_every_rank_in_one_line(tmp_path):
    """Rank 1's student outputs NaN: both ranks decide together at the same step and raise (rank 1 why, rank 0
    that another rank stopped), instead of rank 0 waiting in the gradient all-reduce for a rank that left (with
    NCCL, until the process group's timeout)."""
    script = Path(__file__).parent / "helpers" / "offline_run.py"
    proc = subprocess.run([sys.executable, str(script), "--root", str(tmp_path), "--devices", "2", "--nan-on-rank", "1"],
                          capture_output=True, text=True, timeout=240, env=tiny.script_env(1))
    assert proc.returncode != 0 and "DONE" not in proc.stdout
    assert "ZSKDError: the distillation loss is not finite (nan) at step 0, epoch 0" in proc.stderr
    assert "ZSKDError: the distillation loss is not finite on another rank at step 0, epoch 0" in proc.stderr


def test_a_failed_export_on_rank_0_ends_every_rank(tmp_path):
    """Global rank 0 alone exports the student at the end of fit; when that fails (a full disk), the other ranks
    stop too (one line saying so) instead of going on to the next collective, e.g. a test after fit."""
    script = Path(__file__).parent / "helpers" / "offline_run.py"
    proc = subprocess.run([sys.executable, str(script), "--root", str(tmp_path), "--devices", "2", "--export-fails"],
                          capture_output=True, text=True, timeout=240, env=tiny.script_env(1))
    assert proc.returncode != 0 and "DONE" not in proc.stdout
    assert "No space left on device" in proc.stderr
    assert "ZSKDError: the student's export failed on global rank 0 at the end of fit (step 9)" in proc.stderr


def test_a_failed_record_update_after_a_test_on_rank_0_ends_every_rank(tmp_path):
    """Global rank 0 alone writes the test accuracy into the exported student's record; when that fails, the
    other ranks stop too instead of waiting in the next collective (here a barrier) until the timeout."""
    script = Path(__file__).parent / "helpers" / "offline_run.py"
    proc = subprocess.run([sys.executable, str(script), "--root", str(tmp_path), "--devices", "2",
                           "--test-record-fails"], capture_output=True, text=True, timeout=240, env=tiny.script_env(1))
    assert proc.returncode != 0 and "DONE" not in proc.stdout
    assert "No space left on device" in proc.stderr
    assert "ZSKDError: writing the test accuracy into the exported student's record failed on global rank 0" \
           in proc.stderr


def test_a_new_fit_does_not_take_the_last_fits_batch_for_its_own():
    """A datamodule reused for a second fit in one process: the first fit's last drawing batch, ``(0, 1)``, is not
    the second fit's; a checkpoint of the second fit at that key, before it draws, counts no batch spent."""
    from zskd_lightning.randomness import TrainingStreams

    streams = TrainingStreams()
    streams.start()
    streams.next_batch_seed(0, key=(0, 0))
    streams.next_batch_seed(0, key=(0, 1))
    assert streams.state_dict(unfinished=(0, 1))["augmented_batches"] == 1  # the batch redone: its draw not spent
    streams.start()  # the second fit
    assert streams.state_dict(unfinished=(0, 1))["augmented_batches"] == 0
    streams.load_state_dict({"augmentation_seed": 5, "augmented_batches": 2})
    assert streams.state_dict(unfinished=(0, 1))["augmented_batches"] == 2

