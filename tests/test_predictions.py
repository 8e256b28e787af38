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
