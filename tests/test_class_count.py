"""The number of classes comes from the models' outputs, not from the last ``nn.Linear`` registered: a teacher
that registers its head first, and a student with a convolutional head, distil; ``num_classes`` overrides the
probe; ZSKD's class similarity reads the ``nn.Linear`` with as many outputs as there are classes."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny
from torch import nn

from zskd_lightning import DistillationModule, FrozenTeacher, ImpressionSynthesis
from zskd_lightning.errors import ZSKDError
from zskd_lightning.synthesis.targets import class_similarity
from zskd_lightning.teacher import classifier_layer


class HeadRegisteredFirst(nn.Module):
    """``[B, 1, 8, 8]`` -> 10 logits; the classifier (10 outputs) is registered BEFORE a 12-wide hidden layer."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(12, 10)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class ConvHead(nn.Module):
    """``[B, 1, 8, 8]`` -> 10 logits with no ``nn.Linear`` at all (a 1x1 convolution and global pooling)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 10, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


def test_classes_are_counted_from_the_output():
    torch.manual_seed(0)
    teacher = FrozenTeacher(network=HeadRegisteredFirst())
    assert teacher.count_classes(tiny.INPUT_SHAPE) == 10
    assert teacher.num_classes == 10


def test_declared_num_classes_is_used_without_running_the_network():
    class Refuses(nn.Module):
        def forward(self, x):
            raise AssertionError("never run")

    teacher = FrozenTeacher(network=Refuses(), num_classes=7)
    assert teacher.count_classes(tiny.INPUT_SHAPE) == 7 and teacher.num_classes == 7


def test_num_classes_before_counting_says_how_to_get_it():
    with pytest.raises(ZSKDError, match="count_classes"):
        _ = FrozenTeacher(network=HeadRegisteredFirst()).num_classes


def test_a_head_registered_first_and_a_convolutional_student_distil(tmp_path):
    """Synthesis and one epoch of distillation; the cache records the counted 10 classes."""
    torch.manual_seed(0)
    model = DistillationModule(teacher=HeadRegisteredFirst(), student=ConvHead(), export_filename=None)
    trainer = tiny.quiet_trainer(tmp_path, callbacks=[ImpressionSynthesis(grid_filename=None)])
    trainer.fit(model, datamodule=tiny.make_datamodule(tmp_path / "cache", num_impressions=32))
    assert trainer.state.finished and trainer.global_step == 2
    assert json.loads((tmp_path / "cache" / "spec.json").read_text())["num_classes"] == 10


def test_class_similarity_reads_the_linear_with_one_output_per_class():
    net = HeadRegisteredFirst()
    assert classifier_layer(net, 10) is net.head
    assert classifier_layer(net) is net.body[1]  # without the count: the last registered, the wrong one here
    assert class_similarity(net, 10).shape == (10, 10)
    with pytest.raises(ZSKDError, match="no nn.Linear layer with 10 outputs"):
        class_similarity(ConvHead(), 10)


def test_teacher_and_student_class_mismatch_is_one_line(tmp_path):
    model = DistillationModule(teacher=tiny.make_net(0), student=tiny.make_net(1, num_classes=7), export_filename=None)
    trainer = tiny.quiet_trainer(tmp_path)
    with pytest.raises(ZSKDError, match="teacher outputs 10, student outputs 7"):
        trainer.fit(model, datamodule=tiny.make_datamodule(tmp_path / "cache", num_impressions=16))
