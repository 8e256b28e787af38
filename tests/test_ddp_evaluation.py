"""Validation and test under DDP read every sample exactly once (zskd_lightning/data/evaluation.py): the figures
of two CPU processes (gloo) equal one process's on splits that two ranks cannot halve."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from helpers import tiny
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import TensorDataset

from zskd_lightning import ClassifierModule
from zskd_lightning.data import DigitsDataModule
from zskd_lightning.data.evaluation import evaluation_loader
from zskd_lightning.metrics import mean_metric

SCRIPT = Path(__file__).parent / "helpers" / "evaluate_run.py"


def ddp_trainer(**overrides) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, **overrides)


def served(loader) -> list[int]:
    return [int(i) for (batch,) in loader for i in batch]


def test_ranks_share_an_odd_set_without_repeats(monkeypatch):
    """11 samples on 2 ranks: 6 + 5, together each sample once (a padded sampler serves 12)."""
    dataset, trainer = TensorDataset(torch.arange(11)), ddp_trainer()
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(type(trainer), "distributed_sampler_kwargs", {"num_replicas": 2, "rank": rank})
        shares.append(served(evaluation_loader(dataset, trainer=trainer, batch_size=4)))
    assert [len(s) for s in shares] == [6, 5]
    assert sorted(shares[0] + shares[1]) == list(range(11))


def test_one_process_and_use_distributed_sampler_off_read_everything_in_order():
    dataset = TensorDataset(torch.arange(11))
    assert served(evaluation_loader(dataset, trainer=None, batch_size=4)) == list(range(11))
    trainer = ddp_trainer(use_distributed_sampler=False)
    assert served(evaluation_loader(dataset, trainer=trainer, batch_size=4)) == list(range(11))


def test_evaluating_and_predicting_leave_the_global_random_stream_alone(tmp_path):
    """A new DataLoader iterator draws a base seed from its generator (the global CPU stream by default), so each
    validation moved the training's dropout draws, and a resumed fit (whose persistent workers' iterator is made
    at another time than the unbroken fit's) drew them elsewhere: evaluation and predict loaders have their own."""
    digits = DigitsDataModule(batch_size=64)
    digits.setup("fit"), digits.setup("test"), digits.setup("predict")
    loaders = [evaluation_loader(TensorDataset(torch.arange(11)), trainer=None, batch_size=4),
               digits.val_dataloader(), digits.test_dataloader(), digits.predict_dataloader()]
    torch.manual_seed(0)
    before = torch.get_rng_state()
    for loader in loaders:
        next(iter(loader))
    assert torch.equal(torch.get_rng_state(), before)


def test_a_set_smaller_than_the_ranks_is_padded_with_a_warning(monkeypatch):
    """A rank with no batch could not join the epoch-end gathering of the metrics: one sample on two ranks is
    served to both, and the user is told."""
    trainer = ddp_trainer()
    monkeypatch.setattr(type(trainer), "distributed_sampler_kwargs", {"num_replicas": 2, "rank": 1})
    with pytest.warns(UserWarning, match="1 samples on 2 ranks"):
        loader = evaluation_loader(TensorDataset(torch.arange(1)), trainer=trainer, batch_size=4)
    assert served(loader) == [0]


def lockstep_share(strategy, **limits) -> list[int]:
    """Rank 1's share of 11 samples on 2 ranks under ``strategy`` (a stand-in Trainer)."""
    trainer = SimpleNamespace(strategy=strategy, distributed_sampler_kwargs={"num_replicas": 2, "rank": 1},
                              limit_val_batches=limits.get("val", 1.0), limit_test_batches=limits.get("test", 1.0))
    return served(evaluation_loader(TensorDataset(torch.arange(11)), trainer=trainer, batch_size=4))


def test_strategies_whose_forward_is_collective_and_fractional_limits_get_even_shares():
    """FSDP and DeepSpeed gather parameters in every forward: every rank must run as many batches. A fraction of
    each rank's batches could round to none on one rank only. Both get Lightning's padded shares."""
    assert lockstep_share(DDPStrategy()) == [1, 3, 5, 7, 9]
    assert lockstep_share(object()) == [1, 3, 5, 7, 9, 0]  # not DDP: padded with sample 0
    assert lockstep_share(DDPStrategy(), val=0.5) == [1, 3, 5, 7, 9, 0]


def test_an_impression_modules_eval_data_shards_by_its_trainer(tmp_path):
    """The nested module's loaders take the Trainer's share (rank 0 of 2: 180 of the 360 test images), made
    before any process group exists (where a loader without a Trainer would read all of them)."""
    datamodule = tiny.make_datamodule(tmp_path / "cache", eval_data=DigitsDataModule())
    datamodule.trainer = ddp_trainer()
    datamodule.setup("test")
    assert datamodule.eval_data.trainer is datamodule.trainer
    assert len(list(datamodule.test_dataloader().sampler)) == 180


def test_evaluation_means_stay_float32_and_keep_nan(tmp_path):
    """A '-true' precision casts the module, its metrics' states too; they are float32 again for each loop. A NaN
    loss makes the mean NaN instead of vanishing with a warning."""
    module = ClassifierModule(tiny.make_net(0))
    tiny.quiet_trainer(tmp_path, precision="bf16-true").validate(module, datamodule=DigitsDataModule(), verbose=False)
    assert {module.val_loss.mean_value.dtype, module.val_acc.mean_value.dtype} == {torch.float32}
    mean = mean_metric()
    mean.update(torch.tensor([1.0, float("nan")]))
    assert torch.isnan(mean.compute())


def test_two_processes_report_the_figures_of_one(tmp_path):
    """Validation (143 images, alone and inside fit) and test (359) of a classifier, and a distillation
    module's test through its impressions module's ``eval_data``, in batches of one (rank 0 runs one batch more):
    2 processes give 1 process's figures, losses included (a padded share counts one image twice and moves each
    accuracy; Lightning's ``sync_dist`` mean of a loss divides by a truncated count)."""
    figures = {}
    for devices in (1, 2):
        out = tmp_path / f"devices{devices}" / "figures.json"
        out.parent.mkdir()
        proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--devices", str(devices)],
                              capture_output=True, text=True, timeout=240, env=tiny.script_env(1))
        assert proc.returncode == 0, proc.stderr[-3000:]
        figures[devices] = json.loads(out.read_text())
    assert figures[1].keys() == figures[2].keys() >= {
        "classifier_validate_val_acc", "classifier_validate_val_loss", "classifier_fit_val_acc",
        "classifier_fit_val_loss", "classifier_test_acc", "distillation_test_acc", "distillation_test_teacher_acc"}
    for key, value in figures[1].items():
        assert figures[2][key] == pytest.approx(value, abs=1e-6), key
    assert 0.0 < figures[1]["classifier_test_acc"] < 1.0  # a repeated image would move it
