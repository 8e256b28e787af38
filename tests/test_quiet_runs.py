"""What the library itself causes is not printed as a warning: the frozen teacher's eval mode, and an empty
validation loop when no impressions are held out. A student left in eval mode still gets Lightning's warning."""

from __future__ import annotations

import warnings

import pytest
from helpers import tiny

from zskd_lightning import DistillationModule, ImpressionDataModule, ImpressionSynthesis, ZSKDSynthesizer
from zskd_lightning.data import DigitsDataModule
from zskd_lightning.errors import InvalidArgument


def _fit_warnings(tmp_path, student=None) -> list[str]:
    model = DistillationModule(teacher=tiny.make_net(0), student=student or tiny.make_net(1, width=4),
                               export_filename=None)
    trainer = tiny.quiet_trainer(tmp_path, callbacks=[ImpressionSynthesis(grid_filename=None)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=tiny.make_datamodule(tmp_path / "cache", num_impressions=16))
    assert trainer.global_step > 0
    return [str(w.message) for w in caught]


def test_a_distillation_run_warns_of_nothing_the_library_causes(tmp_path):
    caught = _fit_warnings(tmp_path)
    noise = ("eval mode", "across ranks is zero", "but have no `val_dataloader`")
    assert not [m for m in caught if any(n in m for n in noise)], caught


def test_a_student_in_eval_mode_is_still_reported(tmp_path):
    student = tiny.make_net(1, width=4)
    student.body[0].eval()  # one student module in eval mode (its owner's choice, which fit keeps)
    caught = _fit_warnings(tmp_path, student)
    assert [m for m in caught if "in eval mode at the start of training" in m], caught


def test_synthesis_runs_with_the_threads_it_is_given_and_restores_them(tmp_path, monkeypatch):
    import torch

    from zskd_lightning.impressions import driver

    seen = []
    real_fill = driver.fill_cache

    def fill_and_count(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_fill(*args, **kwargs)

    monkeypatch.setattr(driver, "fill_cache", fill_and_count)
    model = DistillationModule(teacher=tiny.make_net(0), student=tiny.make_net(1, width=4), export_filename=None)
    trainer = tiny.quiet_trainer(tmp_path, limit_train_batches=0,
                                 callbacks=[ImpressionSynthesis(grid_filename=None, num_threads=1)])
    with tiny.torch_threads(2):
        trainer.fit(model, datamodule=tiny.make_datamodule(tmp_path / "cache", num_impressions=16))
        after = torch.get_num_threads()
    assert seen == [1] and after == 2


def test_validate_on_real_logs_the_real_accuracy_beside_the_impressions_agreement(tmp_path):
    model = DistillationModule(teacher=tiny.make_net(0), student=tiny.make_net(1, width=4), export_filename=None)
    trainer = tiny.quiet_trainer(tmp_path, callbacks=[ImpressionSynthesis(grid_filename=None)])
    data = tiny.make_datamodule(tmp_path / "cache", num_impressions=16, num_val_impressions=8,
                                eval_data=DigitsDataModule(batch_size=64), validate_on_real=True)
    trainer.fit(model, datamodule=data)
    metrics = trainer.callback_metrics
    assert {"val/agreement", "val/loss", "val/acc", "val/real_agreement"} <= set(metrics), sorted(metrics)
    assert not [k for k in metrics if "dataloader_idx" in k]


def test_validate_on_real_with_an_empty_real_validation_split_is_one_line(tmp_path):
    """Without it the validation loop ran over no batch and a monitor of ``val/*`` failed later, naming the metric."""
    data = tiny.make_datamodule(tmp_path / "cache", num_impressions=16,
                                eval_data=DigitsDataModule(batch_size=64, val_fraction=0.0), validate_on_real=True)
    with pytest.raises(InvalidArgument, match=r"^validate_on_real needs real validation images; DigitsDataModule's "
                                              r"validation split is empty \(val_fraction 0.0\)"):
        data.setup("fit")


def test_a_fit_without_validation_leaves_the_trainers_validation_setting_as_it_was(tmp_path):
    """A datamodule with nothing to validate on turns the validation loop off for its fit only: the same Trainer
    (its synthesis callback still attached) then validates on real data when asked."""
    model = DistillationModule(teacher=tiny.make_net(0), student=tiny.make_net(1, width=4), export_filename=None)
    trainer = tiny.quiet_trainer(tmp_path, callbacks=[ImpressionSynthesis(grid_filename=None)])
    limit = trainer.limit_val_batches
    trainer.fit(model, datamodule=tiny.make_datamodule(tmp_path / "cache", num_impressions=16))
    assert trainer.limit_val_batches == limit != 0
    (result,) = trainer.validate(model, datamodule=DigitsDataModule(batch_size=64), verbose=False)
    assert "val/acc" in result


def test_a_teacher_input_space_other_than_eval_datas_is_refused_in_one_line(tmp_path):
    """The student learns in the teacher's input space and is tested on eval_data's images as eval_data
    normalizes them: a teacher normalization (or shape) that differs would test it in another space."""
    for changes, named in (({"input_mean": [0.5], "input_std": [0.5]}, r"input_mean \[0.5\] differs from eval_data's"
                            r" \(DigitsDataModule\) \[0.305"),
                           ({"input_shape": [1, 28, 28]}, r"input_shape \[1, 28, 28\] differs")):
        with pytest.raises(InvalidArgument, match=named) as err:
            settings = {"input_shape": tiny.INPUT_SHAPE, "input_mean": tiny.DIGITS_MEAN, "input_std": tiny.DIGITS_STD,
                        **changes}
            ImpressionDataModule(ZSKDSynthesizer(), 8, str(tmp_path / "cache"), eval_data=DigitsDataModule(),
                                 **settings)
        assert "\n" not in str(err.value)
    tiny.make_datamodule(tmp_path / "same", eval_data=DigitsDataModule())  # the same space: accepted
    ImpressionDataModule(ZSKDSynthesizer(), 8, str(tmp_path / "rounded"), eval_data=DigitsDataModule(),
                         input_mean=[0.30497], input_std=[0.37593])  # the same statistics, more decimals: accepted
