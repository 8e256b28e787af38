"""Progress of a synthesis: a bar when the Trainer shows one, a line every ``log_every_seconds`` when it does not,
and the loss and speed of every chunk in the Trainer's logger."""

from __future__ import annotations

import csv
import logging

from helpers import tiny
from lightning.pytorch.loggers import CSVLogger

from zskd_lightning import DistillationModule, ImpressionSynthesis


def _synthesize(tmp_path, **trainer_settings):
    model = DistillationModule(teacher=tiny.make_net(0), student=tiny.make_net(1, width=4), export_filename=None)
    settings = {"limit_train_batches": 0,
                "callbacks": [ImpressionSynthesis(grid_filename=None, log_every_seconds=0.0)], **trainer_settings}
    trainer = tiny.quiet_trainer(tmp_path, **settings)
    trainer.fit(model, datamodule=tiny.make_datamodule(tmp_path / "cache", num_impressions=32))
    return trainer


def test_without_a_bar_progress_lines_are_printed(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        _synthesize(tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("synthesis: ")]
    assert lines, [r.getMessage() for r in caplog.records]
    assert "impressions, chunk" in lines[0] and "loss" in lines[0]


def test_with_a_bar_the_synthesis_has_its_own(tmp_path, capsys):
    _synthesize(tmp_path, enable_progress_bar=True)
    assert "Synthesizing impressions" in capsys.readouterr().err


def test_each_chunk_logs_its_loss_and_speed(tmp_path):
    trainer = _synthesize(tmp_path, logger=CSVLogger(tmp_path / "logs", name="run"))
    rows = list(csv.DictReader(open(f"{trainer.logger.log_dir}/metrics.csv")))
    logged = [r for r in rows if r.get("synthesis/loss")]
    assert len(logged) == 4  # 32 impressions in chunks of 8
    assert all(float(r["synthesis/impressions_per_second"]) > 0 for r in logged)
