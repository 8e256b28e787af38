"""The prediction writer: one file per rank under DDP, whatever the file name's extension."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from zskd_lightning.predictions import PredictionWriter


@pytest.mark.parametrize(("filename", "written"), [("predictions.npz", "predictions.rank1.npz"),
                                                   ("preds", "preds.rank1"), ("out.v2.npz", "out.v2.rank1.npz")])
def test_each_rank_writes_its_own_file(tmp_path, filename, written):
    writer = PredictionWriter(filename)
    trainer = SimpleNamespace(log_dir=str(tmp_path), default_root_dir=str(tmp_path), world_size=2, global_rank=1)
    writer.on_predict_epoch_start(trainer, None)
    writer.write_on_batch_end(trainer, None, torch.tensor([[0.25, 0.75], [0.9, 0.1]]), [3, 5], None, 0, 0)
    writer.on_predict_epoch_end(trainer, None)
    assert writer.written == str(tmp_path / written)
    with np.load(tmp_path / written) as saved:
        assert saved["indices"].tolist() == [3, 5] and saved["labels"].tolist() == [1, 0]


def test_rows_of_several_predict_loaders_say_which_loader_gave_them(tmp_path):
    writer = PredictionWriter()
    trainer = SimpleNamespace(log_dir=str(tmp_path), default_root_dir=str(tmp_path), world_size=1, global_rank=0)
    writer.on_predict_epoch_start(trainer, None)
    writer.write_on_batch_end(trainer, None, torch.tensor([[0.25, 0.75], [0.9, 0.1]]), None, None, 0, 0)
    writer.write_on_batch_end(trainer, None, torch.tensor([[0.5, 0.5]]), None, None, 0, 1)
    writer.write_on_batch_end(trainer, None, torch.tensor([[0.1, 0.9]]), None, None, 1, 0)
    writer.on_predict_epoch_end(trainer, None)
    with np.load(writer.written) as saved:
        assert saved["dataloader_idx"].tolist() == [0, 0, 1, 0]
        assert saved["indices"].tolist() == [0, 1, 0, 2]  # positions count within each loader


def test_a_second_predict_with_nothing_to_write_reports_no_file(tmp_path):
    writer = PredictionWriter()
    trainer = SimpleNamespace(log_dir=str(tmp_path), default_root_dir=str(tmp_path), world_size=2, global_rank=1)
    writer.on_predict_epoch_start(trainer, None)
    writer.write_on_batch_end(trainer, None, torch.tensor([[0.25, 0.75]]), [3], None, 0, 0)
    writer.on_predict_epoch_end(trainer, None)
    assert writer.written is not None
    writer.on_predict_epoch_start(trainer, None)  # this rank's share of the next inputs is empty
    writer.on_predict_epoch_end(trainer, None)
    assert writer.written is None


@pytest.mark.parametrize(("world_size", "expected"), [(1, [0, 1, 2]), (2, [-1, -1, -1])])
def test_rows_without_sampler_indices_are_positions_on_one_process_and_unknown_under_ddp(tmp_path, world_size,
                                                                                           expected):
    """An iterable dataset gives no indices: one process reads it in order; under DDP it shards itself, so the
    rows' places are unknown (-1), never positions that every rank's file would claim alike."""
    writer = PredictionWriter()
    trainer = SimpleNamespace(log_dir=str(tmp_path), default_root_dir=str(tmp_path), world_size=world_size,
                              global_rank=0)
    writer.on_predict_epoch_start(trainer, None)
    writer.write_on_batch_end(trainer, None, torch.tensor([[0.25, 0.75], [0.9, 0.1]]), None, None, 0, 0)
    writer.write_on_batch_end(trainer, None, torch.tensor([[0.5, 0.5]]), None, None, 1, 0)
    writer.on_predict_epoch_end(trainer, None)
    with np.load(writer.written) as saved:
        assert saved["indices"].tolist() == expected


class _Stream(torch.utils.data.IterableDataset):
    """Six inputs ``[2]`` in order, no sampler (so Lightning gives no batch indices)."""

    def __iter__(self):
        return iter(torch.arange(12.0).view(6, 2))


def test_an_iterable_loader_after_a_map_style_one_gets_positions_not_the_last_batchs_indices(tmp_path):
    """Lightning sets the loop's batch indices only for loaders it can index and never clears them: a predict
    over an iterable dataset after one over a map-style dataset (same Trainer, equal batch sizes) was handed the
    last map-style batch's indices for every batch, and wrote them."""
    import lightning as L

    class Softmax(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 3)

        def predict_step(self, batch, batch_idx):
            return self.layer(batch).softmax(dim=-1)

    writer = PredictionWriter()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[writer], enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    model = Softmax()
    mapped = torch.utils.data.DataLoader(torch.arange(16.0).view(8, 2), batch_size=2)
    trainer.predict(model, mapped, return_predictions=False)
    assert np.load(writer.written)["indices"].tolist() == list(range(8))
    trainer.predict(model, torch.utils.data.DataLoader(_Stream(), batch_size=2), return_predictions=False)
    assert np.load(writer.written)["indices"].tolist() == list(range(6))
