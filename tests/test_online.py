"""Online synthesis: the generator engine, the replay buffer, the round driver, checkpoints, DDP and precision."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from helpers import tiny
from helpers.tiny import one_torch_thread  # noqa: F401  (module fixture: one torch thread)
from lightning.pytorch.callbacks import Callback

from zskd_lightning import (DistillationModule, FastSynthesizer, FrozenTeacher, ImpressionDataModule, OnlineSynthesis,
                            ReplayBuffer)
from zskd_lightning.errors import InvalidArgument, ZSKDError
from zskd_lightning.pixels import InputSpec
from zskd_lightning.synthesis import ImageGenerator
from zskd_lightning.synthesis.api import Chunk, SynthesisContext

ONLINE_SCRIPT = Path(__file__).resolve().parent / "helpers" / "online_run.py"


def context(teacher=None, student=None) -> SynthesisContext:
    return SynthesisContext(teacher=teacher or tiny.make_net(0).eval(), student=student or tiny.make_net(1, width=4),
                            input_spec=InputSpec(tiny.INPUT_SHAPE, tiny.DIGITS_MEAN, tiny.DIGITS_STD), num_classes=10)


# ------------------------------------------------------------------------------------------------- generator
@pytest.mark.parametrize("autocast", [False, True])  # bf16: the map to the range is float32 (2.8215 -> 2.828)
def test_generated_inputs_stay_in_the_valid_range_even_with_huge_weights(autocast):
    low, high = tiny.digits_input_range()
    generator = ImageGenerator(tiny.INPUT_SHAPE, noise_dim=8, width=4, input_range=(low, high))
    with torch.no_grad():
        for p in generator.parameters():
            p.mul_(1000)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        x = generator(torch.randn(64, 8))
    assert x.shape == (64, *tiny.INPUT_SHAPE) and x.dtype == torch.float32
    assert bool((x >= low - 1e-5).all()) and bool((x <= high + 1e-5).all())
    assert float(x.max() - x.min()) > 0.5 * float((high - low).min())  # saturates at both ends, still inside


def test_generator_shape_errors_are_one_line():
    with pytest.raises(InvalidArgument, match=r"divisible by 4, got \(1, 6, 6\)"):
        ImageGenerator((1, 6, 6))
    with pytest.raises(InvalidArgument, match="conditional"):
        ImageGenerator(tiny.INPUT_SHAPE, num_classes=10)(torch.randn(2, 100))


def test_batchnorm_term_on_a_teacher_without_batchnorm_is_a_one_line_error():
    synthesizer = FastSynthesizer(batchnorm=10.0, batch_size=8, width=4, noise_dim=8)
    with pytest.raises(InvalidArgument) as caught:
        synthesizer.setup(context())
    assert "BatchNorm" in str(caught.value) and "\n" not in str(caught.value)


def test_batchnorm_term_runs_on_a_batchnorm_teacher():
    synthesizer = FastSynthesizer(batchnorm=10.0, batch_size=8, width=4, noise_dim=8, steps_per_round=2)
    ctx = context(teacher=tiny.make_bn_teacher(0))
    synthesizer.setup(ctx)
    result = synthesizer.round(ctx, Chunk.of(0, 0, 0, 8))
    assert result.inputs.shape == (8, *tiny.INPUT_SHAPE) and torch.isfinite(result.loss).all()
    assert result.labels.tolist() == list(range(8))  # class index mod K: a round is class-balanced


def test_a_round_averages_the_saved_statistics_across_processes_not_the_output_range():
    """``average`` sees the gradients and the BatchNorm running statistics; the output range (``low``/``high``,
    buffers that are not saved) is the same on every rank: averaging it could move it by an ulp a round."""
    ctx = context()
    synthesizer = FastSynthesizer(batch_size=8, width=4, noise_dim=8, steps_per_round=1)
    synthesizer.setup(ctx)
    averaged = []
    synthesizer.round(ctx, Chunk.of(0, 0, 0, 8), average=averaged.append)
    generator = synthesizer.generator
    statistics = [b for name, b in generator.named_buffers() if name.endswith(("running_mean", "running_var"))]
    buffers_seen = averaged[-1]
    assert statistics and {id(b) for b in buffers_seen} == {id(b) for b in statistics}
    assert not {id(generator.low), id(generator.high)} & {id(b) for b in buffers_seen}


def test_setup_and_rounds_run_inside_a_callers_inference_mode():
    """Weights, targets and noise are made where autograd may save them, whatever mode the caller is in."""
    ctx = context()
    synthesizer = FastSynthesizer(batch_size=8, width=4, noise_dim=8, steps_per_round=2)
    with torch.inference_mode():
        synthesizer.setup(ctx)
        result = synthesizer.round(ctx, Chunk.of(0, 0, 0, 8))
    assert torch.isfinite(result.loss).all()
    assert not any(p.is_inference() for p in synthesizer.generator.parameters())


def test_a_student_that_views_its_conv_features_reads_the_generators_channels_last_inputs():
    """The generator makes channels-last inputs (three channels here: one-channel outputs come out row-major);
    the student gets them in the layout it trains on. The teacher is told the same (``channels_last=False``)."""
    ctx = SynthesisContext(teacher=FrozenTeacher(network=tiny.ViewNet(in_channels=3), channels_last=False),
                           student=tiny.ViewNet(in_channels=3), input_spec=InputSpec((3, 8, 8), (0.5,) * 3, (0.25,) * 3),
                           num_classes=10)
    synthesizer = FastSynthesizer(adversarial=1.0, batch_size=8, width=4, noise_dim=8, steps_per_round=1)
    synthesizer.setup(ctx)
    assert torch.isfinite(synthesizer.round(ctx, Chunk.of(0, 0, 0, 8)).loss).all()


def test_a_zero_adversarial_temperature_is_refused_under_its_own_name():
    """SSD-KD's phi has a ``temperature`` of its own: the error names the one given."""
    with pytest.raises(InvalidArgument, match=r"^adversarial_temperature must be > 0, got 0"):
        FastSynthesizer(adversarial_temperature=0)


def test_a_round_lowers_the_generator_loss_and_leaves_the_student_alone():
    student = tiny.make_net(1, width=4)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    ctx = context(student=student)
    synthesizer = FastSynthesizer(batch_size=32, width=8, noise_dim=8, steps_per_round=30, lr=0.01)
    synthesizer.setup(ctx)
    first = synthesizer.round(ctx, Chunk.of(0, 0, 0, 32)).loss.mean()
    later = synthesizer.round(ctx, Chunk.of(0, 0, 0, 32)).loss.mean()
    assert later < first  # cross-entropy to the sampled classes falls as the generator learns
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert student.training


def test_a_learned_noise_moves_each_input_towards_its_sampled_class():
    """``noise_lr`` (FastDFKD's latent code): the noise is learned beside the generator, so the round's later
    steps differ from a fixed noise's, its first step's gradients on the generator are the same, and the
    cross-entropy to the sampled classes ends lower. On several processes only the generator's gradients (and
    one flag of the noise's finiteness) are averaged."""
    ctx = context()
    results, generators = {}, {}
    for noise_lr in (None, 0.5):
        synthesizer = FastSynthesizer(batch_size=32, width=8, noise_dim=8, steps_per_round=1, lr=0.01,
                                      noise_lr=noise_lr, adversarial=0.0, activation=0.0, balance=0.0)
        synthesizer.setup(ctx)
        results[noise_lr, 1] = synthesizer.round(ctx, Chunk.of(0, 0, 0, 32))
        generators[noise_lr] = {k: v.clone() for k, v in synthesizer.generator.state_dict().items()}
        synthesizer.steps_per_round = 20
        results[noise_lr, 20] = synthesizer.round(ctx, Chunk.of(0, 1, 32, 64))
    assert torch.equal(results[None, 1].inputs, results[0.5, 1].inputs)  # the noise moves after the step
    assert all(torch.equal(generators[None][k], generators[0.5][k]) for k in generators[None])
    assert results[0.5, 20].loss.mean() < results[None, 20].loss.mean()
    synthesizer = FastSynthesizer(batch_size=8, width=4, noise_dim=8, steps_per_round=1, noise_lr=0.5)
    synthesizer.setup(ctx)
    averaged = []
    synthesizer.round(ctx, Chunk.of(0, 0, 0, 8), average=averaged.append)
    generator_params = [p for p in synthesizer.generator.parameters() if p.requires_grad]
    assert len(averaged[0]) == len(generator_params) + 1 and averaged[0][-1].tolist() == [1.0]
    with pytest.raises(InvalidArgument, match=r"^noise_lr must be > 0 or None, got 0"):
        FastSynthesizer(noise_lr=0)


def test_moved_inputs_train_the_generator_and_the_unmoved_ones_are_kept(monkeypatch):
    """``augment_shift`` / ``augment_flip`` (FastDFKD's crop with padding and flip): the networks see the
    generated batch moved, the round keeps the generator's own inputs (a one-step round's are those of a round
    without moves: the noise is drawn as before) labelled by the teacher's argmax on them, each step's moves
    are seeded from the chunk and the step (the same chunk moves alike; the global generators do not move), and
    bad values are refused in one line."""
    from zskd_lightning.synthesis import generator as engine
    teacher = tiny.make_net(0).eval()
    seen, seeds = [], []
    teacher.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    real = engine.shift_and_flip
    monkeypatch.setattr(engine, "shift_and_flip", lambda pixels, shift, flip, generator: (
        seeds.append(generator.initial_seed()), real(pixels, shift, flip, generator))[1])
    ctx = context(teacher=teacher)
    kept = {}
    for shift, flip in ((0, False), (2, True)):
        synthesizer = FastSynthesizer(classes="teacher", batch_size=16, width=4, noise_dim=8, steps_per_round=1,
                                      augment_shift=shift, augment_flip=flip)
        synthesizer.setup(ctx)
        seen.clear()
        state = torch.get_rng_state()
        kept[shift] = synthesizer.round(ctx, Chunk.of(0, 0, 0, 16))
        assert torch.equal(torch.get_rng_state(), state)
        assert torch.equal(seen[0], kept[shift].inputs) == (shift == 0)  # the step's pass: moved or not
        with torch.no_grad():
            assert torch.equal(kept[shift].labels, teacher(kept[shift].inputs).argmax(dim=1))
    assert torch.equal(kept[0].inputs, kept[2].inputs)
    moved = []
    for _ in range(2):
        synthesizer = FastSynthesizer(batch_size=16, width=4, noise_dim=8, steps_per_round=2, augment_shift=2,
                                      augment_flip=True)
        synthesizer.setup(ctx)
        seen.clear(), seeds.clear()
        synthesizer.round(ctx, Chunk.of(0, 3, 0, 16))
        moved.append((list(seen), list(seeds)))
    (first_seen, first_seeds), (again_seen, again_seeds) = moved
    assert len(first_seen) == 3 and all(torch.equal(a, b) for a, b in zip(first_seen, again_seen))
    assert first_seeds == again_seeds and len(set(first_seeds)) == 2  # one per step, each its own
    seeds.clear()
    synthesizer.round(ctx, Chunk.of(0, 4, 0, 16))
    assert not set(seeds) & set(first_seeds)  # another chunk, other moves
    for bad in (-1, 1.5, True, "4"):
        with pytest.raises(InvalidArgument, match=r"^augment_shift must be a whole number of pixels >= 0"):
            FastSynthesizer(augment_shift=bad)
    with pytest.raises(InvalidArgument, match=r"^augment_shift must be smaller than the input"):
        FastSynthesizer(augment_shift=tiny.INPUT_SHAPE[-1], width=4, noise_dim=8).setup(ctx)


def test_generator_setup_leaves_the_cuda_generators_alone(monkeypatch):
    """The generator's initial weights come from the data seed; a GPU fit's own CUDA stream is not reseeded."""
    ctx, reseeded = context(), []  # the tiny networks are made with torch.manual_seed: before the watch
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    cpu_state = torch.get_rng_state()
    FastSynthesizer(batch_size=4, width=8, noise_dim=8).setup(ctx)
    assert reseeded == [] and torch.equal(torch.get_rng_state(), cpu_state)


def test_reptile_moves_the_meta_weights_part_of_the_way():
    ctx = context()
    synthesizer = FastSynthesizer(batch_size=8, width=4, noise_dim=8, steps_per_round=3, lr=0.05, reptile_lr=0.5)
    synthesizer.setup(ctx)
    meta_before = {k: v.clone() for k, v in synthesizer.meta_state.items()}
    synthesizer.round(ctx, Chunk.of(0, 0, 0, 8))
    fast = synthesizer.generator.state_dict()
    weight = "project.weight"
    assert torch.allclose(synthesizer.meta_state[weight], (meta_before[weight] + fast[weight]) / 2, atol=1e-6)
    synthesizer.round(ctx, Chunk.of(0, 1, 8, 16))  # the next round starts from the meta weights
    assert not torch.equal(synthesizer.meta_state[weight], fast[weight])


def test_an_adam_meta_step_follows_fastdfkd_rules(monkeypatch):
    """``meta_optimizer``: Adam at ``lr x steps`` on the meta weights, whose first step moves each weight by the
    learning rate against the sign of its gradient: ``meta - fast`` (Reptile) or the sum of the round's
    generator gradients (FOMAML). BatchNorm's statistics take the round's values, and the meta optimizer's state
    comes back from a checkpoint."""
    ctx = context()
    lr, steps, weight = 0.01, 3, "project.weight"
    for rule in ("reptile", "fomaml"):
        synthesizer = FastSynthesizer(batch_size=8, width=4, noise_dim=8, steps_per_round=steps, lr=lr,
                                      meta_optimizer=rule)
        synthesizer.setup(ctx)
        recorded = []
        new_optimizer = synthesizer._new_optimizer

        def recording_optimizer():
            optimizer = new_optimizer()
            step = optimizer.step

            def recording_step(*args, **kwargs):
                recorded.append(synthesizer.generator.project.weight.grad.clone())
                return step(*args, **kwargs)

            optimizer.step = recording_step
            return optimizer

        monkeypatch.setattr(synthesizer, "_new_optimizer", recording_optimizer)
        before = {k: v.clone() for k, v in synthesizer.meta_state.items()}
        synthesizer.round(ctx, Chunk.of(0, 0, 0, 8))
        fast = synthesizer.generator.state_dict()
        gradient = before[weight] - fast[weight] if rule == "reptile" else sum(recorded)
        assert len(recorded) == steps
        clear = gradient.abs() > 1e-4  # Adam's first step: the sign, where eps does not count
        assert clear.float().mean() > 0.5
        moved = synthesizer.meta_state[weight] - before[weight]
        torch.testing.assert_close(moved[clear], -lr * steps * gradient.sign()[clear], rtol=0.02, atol=1e-6)
        statistics = [k for k in fast if "running_mean" in k]
        assert statistics and all(torch.equal(synthesizer.meta_state[k], fast[k]) for k in statistics)
        saved = synthesizer.state_dict()
        restored = FastSynthesizer(batch_size=8, width=4, noise_dim=8, steps_per_round=steps, lr=lr,
                                   meta_optimizer=rule)
        restored.setup(ctx)
        restored.load_state_dict(saved)
        assert restored.meta_adam.state_dict()["state"][0]["step"] == 1
        assert restored.meta_state[weight] is not saved["meta"][weight]  # its own copy, not the caller's
        fresh = FastSynthesizer(batch_size=8, width=4, noise_dim=8, steps_per_round=1, meta_optimizer=rule)
        fresh.setup(ctx)
        with torch.inference_mode():  # Adam's state made under a caller's inference mode stays usable outside it
            fresh.round(ctx, Chunk.of(0, 1, 0, 8))
        fresh.round(ctx, Chunk.of(0, 2, 0, 8))
        assert fresh.meta_adam.state_dict()["state"][0]["step"] == 2
        assert restored.meta_adam.param_groups[0]["params"][0] is restored.meta_state["project.weight"]
    with pytest.raises(InvalidArgument, match=r"^give reptile_lr .* or meta_optimizer .*, not both"):
        FastSynthesizer(reptile_lr=0.5, meta_optimizer="reptile")
    with pytest.raises(InvalidArgument, match=r"^meta_optimizer must be 'reptile', 'fomaml' or None, got 'maml'"):
        FastSynthesizer(meta_optimizer="maml")


def test_a_round_can_keep_its_lowest_loss_step(monkeypatch):
    """``keep="lowest_loss"`` (FastDFKD's code): the round returns the inputs of the step whose batch loss was
    lowest, with their labels and losses; ``"last"`` those of the last step. Constant offsets added to each step's
    loss choose the step without changing any gradient."""
    teacher = tiny.make_net(0).eval()
    seen = []
    teacher.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    ctx = context(teacher=teacher)
    offsets = iter([])
    summed_loss = FastSynthesizer.summed_loss
    monkeypatch.setattr(FastSynthesizer, "summed_loss", lambda self, *args: summed_loss(self, *args) + next(offsets))
    kept = {}
    for keep in ("last", "lowest_loss"):
        synthesizer = FastSynthesizer(batch_size=8, width=4, noise_dim=8, steps_per_round=4, keep=keep)
        synthesizer.setup(ctx)
        seen.clear()
        offsets = iter([0.0, -100.0, 0.0, 0.0])  # added to each step's loss summed over the batch
        kept[keep] = synthesizer.round(ctx, Chunk.of(0, 0, 0, 8))
        assert len(seen) == 4
        assert torch.equal(kept[keep].inputs, seen[1 if keep == "lowest_loss" else 3])
        with torch.no_grad():
            assert torch.equal(kept[keep].predicted, teacher(kept[keep].inputs).argmax(dim=1))
    assert not torch.equal(kept["last"].inputs, kept["lowest_loss"].inputs)
    with pytest.raises(InvalidArgument, match=r"^keep must be 'last' or 'lowest_loss', got 'best'"):
        FastSynthesizer(keep="best")


def test_batchnorm_momentum_matches_a_memory_of_earlier_rounds():
    """FastDFKD's ``bn_mmt``: the first round matches its batch statistics alone, and remembers its last step's;
    later rounds match ``(1 - m) x batch + m x memory``, and blend their last step's in. Averaged across processes
    (``average``), kept in the synthesizer's state, refused by the impression engine."""
    from zskd_lightning import ZSKDSynthesizer
    from zskd_lightning.synthesis import BatchNormStatisticsWithMomentum

    teacher = tiny.make_bn_teacher(0).eval()
    ctx = context(teacher=teacher)
    settings = dict(batchnorm=1.0, batch_size=8, width=4, noise_dim=8, steps_per_round=2)
    synthesizer = FastSynthesizer(batchnorm_momentum=0.9, **settings)
    synthesizer.setup(ctx)
    term = next(r for r in synthesizer.regularizers if isinstance(r, BatchNormStatisticsWithMomentum))
    batch_statistics = []
    matched = BatchNormStatisticsWithMomentum._matched

    def recording(self, key, mean, var):
        batch_statistics.append((key, mean.detach().clone(), var.detach().clone()))
        blended = matched(self, key, mean, var)
        if term.memory is None:  # the first round: its batch alone
            assert torch.equal(blended[0], mean) and torch.equal(blended[1], var)
        return blended

    layers = len(term._layers)
    averaged = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(BatchNormStatisticsWithMomentum, "_matched", recording)  # the batch's own, before the blend
        synthesizer.round(ctx, Chunk.of(0, 0, 0, 8))
        first = {key: (mean, var) for key, mean, var in batch_statistics[-layers:]}  # the last step's
        assert set(term.memory) == set(first) and len(first) == layers
        assert all(torch.equal(term.memory[k][0], first[k][0]) and torch.equal(term.memory[k][1], first[k][1])
                   for k in first)
        remembered = {k: (m.clone(), v.clone()) for k, (m, v) in term.memory.items()}
        # the second round's loss: the blend; its memory: 0.9 x the first's + 0.1 x its own last step's
        response_seen = {}
        call = BatchNormStatisticsWithMomentum.__call__

        def recording_call(self, inputs, response):
            response_seen["loss"] = call(self, inputs, response).detach()
            return call(self, inputs, response)

        patch.setattr(BatchNormStatisticsWithMomentum, "__call__", recording_call)
        synthesizer.round(ctx, Chunk.of(0, 1, 0, 8), average=lambda tensors: averaged.append(len(tensors)))
    assert 2 * layers in averaged  # the memory's mean and variance of every layer went through the mean
    second = {key: (mean, var) for key, mean, var in batch_statistics[-layers:]}
    expected = 0.0
    for tap, layer in term._layers:
        mean, var = second[tap.key]
        blend_mean = 0.1 * mean + 0.9 * remembered[tap.key][0]
        blend_var = 0.1 * var + 0.9 * remembered[tap.key][1]
        expected += float(torch.linalg.vector_norm(blend_mean - layer.running_mean)
                          + torch.linalg.vector_norm(blend_var - layer.running_var))
        torch.testing.assert_close(term.memory[tap.key][0], 0.9 * remembered[tap.key][0] + 0.1 * mean)
        torch.testing.assert_close(term.memory[tap.key][1], 0.9 * remembered[tap.key][1] + 0.1 * var)
    assert float(response_seen["loss"]) == pytest.approx(expected, rel=1e-5)
    restored = FastSynthesizer(batchnorm_momentum=0.9, **settings)
    restored.setup(ctx)
    restored.load_state_dict(synthesizer.state_dict())
    copy = next(r for r in restored.regularizers if isinstance(r, BatchNormStatisticsWithMomentum))
    assert all(torch.equal(copy.memory[k][i], term.memory[k][i]) for k in term.memory for i in (0, 1))
    assert copy.memory[next(iter(term.memory))][0] is not term.memory[next(iter(term.memory))][0]
    restored.setup(ctx)  # a new run forgets the rounds
    assert copy.memory is None
    restored.load_state_dict(synthesizer.state_dict() | {"regularizers": []})  # a checkpoint of before them
    assert copy.memory is None
    plain = FastSynthesizer(**settings)  # the same terms, BatchNorm's without a memory
    plain.setup(ctx)
    with pytest.raises(ZSKDError, match=r"^the checkpoint's generator remembers earlier rounds in "
                                        r"BatchNormStatisticsWithMomentum"):
        plain.load_state_dict(synthesizer.state_dict())
    bare = synthesizer.state_dict()  # the first format of the memories: each term's state without its name
    bare["regularizers"] = [entry["state"] for entry in bare["regularizers"]]
    with pytest.raises(ZSKDError, match=r"^the checkpoint's generator remembers earlier rounds in a term saved"):
        restored.load_state_dict(bare)
    other_layers = synthesizer.state_dict()
    other_layers["regularizers"][0]["state"]["memory"] = {"features.9:input": {"mean": torch.zeros(3),
                                                                               "var": torch.ones(3)}}
    with pytest.raises(ZSKDError, match=r"^the checkpoint's BatchNorm memory is for layers .*: resume with its"):
        restored.load_state_dict(other_layers)
    fewer = FastSynthesizer(batchnorm=1.0, activation=0.0, balance=0.0, adversarial=0.0, batchnorm_momentum=0.9,
                            batch_size=8, width=4, noise_dim=8)
    fewer.setup(ctx)
    with pytest.raises(ZSKDError, match="remembers earlier rounds in BatchNormStatisticsWithMomentum .* this one"):
        fewer.load_state_dict(synthesizer.state_dict())
    with pytest.raises(InvalidArgument, match="^BatchNormStatisticsWithMomentum remembers earlier generator rounds"):
        ZSKDSynthesizer(regularizers=[BatchNormStatisticsWithMomentum(0.01)])
    with pytest.raises(InvalidArgument, match=r"^batchnorm_momentum \(0.9\) blends .* batchnorm is 0.0"):
        FastSynthesizer(batchnorm_momentum=0.9)
    with pytest.raises(InvalidArgument, match=r"momentum must be in \[0, 1\), got 1.0"):
        BatchNormStatisticsWithMomentum(momentum=1.0)


def test_batchnorm_memory_resumes_with_a_batchnorm_off_the_forward_path():
    """A teacher's BatchNorm that never runs (an auxiliary head's) has no memory: the checkpoint still loads."""
    from zskd_lightning.synthesis import BatchNormStatisticsWithMomentum

    teacher = tiny.make_bn_teacher(0).eval()
    teacher.aux = nn.BatchNorm1d(4).eval()  # registered, never in forward
    ctx = context(teacher=teacher)
    settings = dict(batchnorm=1.0, batchnorm_momentum=0.9, batch_size=8, width=4, noise_dim=8, steps_per_round=1)
    synthesizer = FastSynthesizer(**settings)
    synthesizer.setup(ctx)
    synthesizer.round(ctx, Chunk.of(0, 0, 0, 8))
    restored = FastSynthesizer(**settings)
    restored.setup(ctx)
    restored.load_state_dict(synthesizer.state_dict())
    term = next(r for r in restored.regularizers if isinstance(r, BatchNormStatisticsWithMomentum))
    assert [tap.path for tap, _ in term._layers] == ["body.1", "aux"] and list(term.memory) == ["body.1:input"]
    restored.round(ctx, Chunk.of(0, 1, 0, 8))
    assert list(term.memory) == ["body.1:input"]


def test_batchnorm_memory_pools_the_statistics_of_every_process():
    """Under DDP each process sends its last step's mean and second moment: the memory holds the statistics of
    all the processes' batches together, the spread between their means included."""
    from zskd_lightning.synthesis import BatchNormStatisticsWithMomentum

    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 3, generator=generator), torch.randn(16, 3, generator=generator) + 2.0]
    terms = [BatchNormStatisticsWithMomentum(momentum=0.5) for _ in batches]
    for term, batch in zip(terms, batches):
        term._matched("layer:input", batch.mean(0), batch.var(0, unbiased=False))
    sent = []
    terms[1].end_round(lambda tensors: sent.extend(t.clone() for t in tensors))  # what process 1 contributes

    def mean_of_both(tensors):  # the collective, as process 0 sees it
        for mine, theirs in zip(tensors, sent, strict=True):
            mine.add_(theirs).div_(2)

    terms[0].end_round(mean_of_both)
    together = torch.cat(batches)
    mean, var = terms[0].memory["layer:input"]
    torch.testing.assert_close(mean, together.mean(0))
    torch.testing.assert_close(var, together.var(0, unbiased=False))
    assert bool((var > batches[0].var(0, unbiased=False) + 0.5).all())  # the means' spread counts


def test_a_draw_takes_inputs_from_the_generator_without_changing_it():
    ctx = context()
    synthesizer = FastSynthesizer(classes="teacher", batch_size=16, width=4, noise_dim=8, steps_per_round=2)
    synthesizer.setup(ctx)
    synthesizer.round(ctx, Chunk.of(0, 0, 0, 16))
    before = {k: v.clone() for k, v in synthesizer.generator.state_dict().items()}
    drawn = synthesizer.draw(ctx, Chunk.of(0, 1, 16, 40))
    assert drawn.inputs.shape == (24, *tiny.INPUT_SHAPE) and drawn.steps == 0 and drawn.loss.shape == (24,)
    after = synthesizer.generator.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm running statistics
    with torch.no_grad():
        assert torch.equal(drawn.labels, ctx.teacher(drawn.inputs).argmax(dim=1))  # labelled by the teacher
    again = synthesizer.draw(ctx, Chunk.of(0, 1, 16, 40))
    assert torch.equal(again.inputs, drawn.inputs)  # the chunk's noise decides the draw
    assert not torch.equal(synthesizer.draw(ctx, Chunk.of(0, 2, 16, 40)).inputs, drawn.inputs)


def test_a_bf16_round_keeps_float32_inputs_and_weights_close_to_float32():
    ctx = context()
    made = {}
    for precision in ("32-true", "bf16-mixed"):
        synthesizer = FastSynthesizer(batch_size=16, width=8, noise_dim=8, steps_per_round=1, precision=precision)
        synthesizer.setup(ctx)  # the same start: weights from (seed, "setup")
        made[precision] = synthesizer.round(ctx, Chunk.of(0, 0, 0, 16))  # the inputs before the step
        assert all(p.dtype == torch.float32 for p in synthesizer.generator.parameters())
    full, half = made["32-true"].inputs, made["bf16-mixed"].inputs
    assert half.dtype == torch.float32 and torch.isfinite(made["bf16-mixed"].loss).all()
    scale = float(full.abs().max())
    assert 0 < float((half - full).abs().max()) < 0.02 * scale  # bf16 arithmetic: close, not identical
    with pytest.raises(InvalidArgument, match="precision must be one of"):
        FastSynthesizer(precision="16-mixed")


# ---------------------------------------------------------------------------------------------------- buffer
def test_buffer_is_a_ring_and_round_trips_its_state():
    buffer = ReplayBuffer(5, (1, 2, 2))
    slots = buffer.add(torch.zeros(3, 1, 2, 2), torch.tensor([0, 1, 2]))
    assert slots.tolist() == [0, 1, 2] and len(buffer) == 3
    slots = buffer.add(torch.ones(4, 1, 2, 2), torch.tensor([3, 4, 5, 6]))
    assert slots.tolist() == [3, 4, 0, 1] and len(buffer) == 5  # the oldest entries go first
    assert buffer.labels.tolist() == [5, 6, 2, 3, 4] and buffer.written == 7
    assert buffer.stamps.tolist() == [6, 7, 3, 4, 5]  # each write's own stamp
    restored = ReplayBuffer(5, (1, 2, 2))
    restored.load_state_dict(buffer.state_dict())
    assert torch.equal(restored.inputs, buffer.inputs) and torch.equal(restored.labels, buffer.labels)
    assert torch.equal(restored.stamps, buffer.stamps)
    assert restored.add(torch.zeros(1, 1, 2, 2), torch.tensor([9])).tolist() == [2]  # the cursor came along
    smaller = ReplayBuffer(5, (1, 2, 2))
    smaller.add(torch.ones(2, 1, 2, 2), torch.tensor([7, 8]))
    restored.load_state_dict(smaller.state_dict())  # a used buffer takes a state of fewer entries: no stale rows
    assert len(restored) == 2 and restored.labels.tolist() == [7, 8, -1, -1, -1]
    assert restored.stamps.tolist() == [1, 2, 0, 0, 0] and not restored.inputs[2:].any()
    with pytest.raises(InvalidArgument, match=r"inputs \[1, 2, 2\] with one label each; got inputs \[2, 3\]"):
        buffer.add(torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(ZSKDError, match="holds 5 inputs"):
        ReplayBuffer(6, (1, 2, 2)).load_state_dict(buffer.state_dict())


# ------------------------------------------------------------------------------------------------ online fit
def test_a_tiny_online_fit_fills_a_balanced_buffer_and_draws_a_picture(tmp_path):
    model, datamodule = tiny.online_setup(steps_per_epoch=6)
    trainer = tiny.quiet_trainer(tmp_path, max_epochs=2)
    trainer.fit(model, datamodule=datamodule)
    online = [c for c in trainer.callbacks if isinstance(c, OnlineSynthesis)]
    assert len(online) == 1  # asked for by the datamodule, added by DistillationModule.configure_callbacks
    # 2 warm-up rounds, then one before every second step after the first (steps 2, 4, ..., 10)
    assert online[0].rounds == 2 + 5 and datamodule.buffer.written == 7 * 16
    assert len(datamodule.buffer) == 48 and datamodule.buffer.class_counts(10).tolist().count(0) == 0
    low, high = tiny.digits_input_range()
    held = datamodule.buffer.inputs
    assert bool((held >= low - 1e-5).all()) and bool((held <= high + 1e-5).all())
    assert (tmp_path / "buffer.png").exists()
    assert trainer.callback_metrics["online/round"] == 7


def test_a_buffer_picture_that_cannot_be_written_is_a_warning_not_a_failed_fit(tmp_path, monkeypatch):
    """Rank 0 alone draws it at the end of training, while the other ranks of a DDP fit go on to the export's
    collectives: an error there would leave them waiting."""
    from zskd_lightning import pictures

    def disk_full(picture, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pictures, "save_picture", disk_full)
    model, datamodule = tiny.online_setup(steps_per_epoch=2)
    trainer = tiny.quiet_trainer(tmp_path, max_epochs=1)
    with pytest.warns(UserWarning, match=r"the replay_buffer picture was not written to .*buffer.png: OSError: .*No "
                                         r"space left"):
        trainer.fit(model, datamodule=datamodule)
    assert trainer.state.finished and not (tmp_path / "buffer.png").exists()


def test_a_synthesis_callback_subclass_on_the_trainer_takes_the_place_of_the_default():
    class MySynthesis(OnlineSynthesis):
        pass

    model, datamodule = tiny.online_setup()
    mine = MySynthesis()
    trainer = tiny.quiet_trainer(".", callbacks=[mine])
    trainer.datamodule = datamodule  # what fit sets before it asks the module for callbacks
    model.trainer = trainer
    assert not [c for c in model.configure_callbacks() if isinstance(c, OnlineSynthesis)]
    trainer.callbacks = [c for c in trainer.callbacks if c is not mine]
    assert [type(c) for c in model.configure_callbacks() if isinstance(c, OnlineSynthesis)] == [OnlineSynthesis]


def test_rounds_with_draws_write_that_many_more_inputs(tmp_path):
    model, datamodule = tiny.online_setup(steps_per_epoch=6, buffer_size=200, draws_per_round=2)
    trainer = tiny.quiet_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, datamodule=datamodule)
    online = next(c for c in trainer.callbacks if isinstance(c, OnlineSynthesis))
    assert online.rounds == 2 + 2 and online.synthesized == 4 * 3 * 16 == datamodule.buffer.written
    held = datamodule.buffer.inputs[:192]
    assert len(torch.unique(held.flatten(1), dim=0)) == 192  # every draw is new, none repeats the round's batch


@pytest.mark.parametrize("setting, message", [
    ({"draws_per_round": -1}, "draws_per_round must be >= 0, got -1"),
    ({"warmup_rounds": 0}, "warmup_rounds must be >= 1, got 0"),
    ({"buffer_size": 0}, "buffer_size must be >= 1, got 0"),
])
def test_bad_online_settings_are_one_line_errors(setting, message):
    with pytest.raises(InvalidArgument, match=message):
        tiny.online_setup(**setting)


def test_online_figures_reach_the_progress_bar_with_step_logging_off(tmp_path):
    model, datamodule = tiny.online_setup(steps_per_epoch=6)
    trainer = tiny.quiet_trainer(tmp_path, max_epochs=1, log_every_n_steps=0)
    trainer.fit(model, datamodule=datamodule)
    assert trainer.progress_bar_metrics["round"] == 2 + 2  # warm-up rounds, then before steps 2 and 4


def test_online_fit_in_bf16_through_the_trainer(tmp_path):
    model, datamodule = tiny.online_setup(steps_per_epoch=4)
    seen = {"teacher": set(), "student": set()}
    for name, network in (("teacher", model.teacher), ("student", model.student)):
        layer = next(m for m in network.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
        layer.register_forward_hook(lambda module, args, out, name=name: seen[name].add(out.dtype))
    trainer = tiny.quiet_trainer(tmp_path, precision="bf16-mixed")
    trainer.fit(model, datamodule=datamodule)
    assert torch.isfinite(datamodule.buffer.inputs).all() and len(datamodule.buffer) == 48
    assert torch.bfloat16 in seen["teacher"] and torch.bfloat16 in seen["student"]  # the Trainer's precision


def test_replay_batches_return_per_sample_losses_and_use_importance_weights():
    model = DistillationModule(teacher=tiny.make_net(0), student=tiny.make_net(1, width=4), export_filename=None)
    x = torch.randn(6, *tiny.INPUT_SHAPE)
    plain = model.training_step({"inputs": x, "slots": torch.arange(6)}, 0)
    assert plain["per_sample_loss"].shape == (6,)
    with torch.no_grad():  # T^2 KL(teacher || student) of each input, as the sampler's priorities take it
        teacher_log_p = torch.log_softmax(model.teacher(x) / 20.0, dim=1)
        student_log_p = torch.log_softmax(model.student(x) / 20.0, dim=1)
        by_hand = 400.0 * (teacher_log_p.exp() * (teacher_log_p - student_log_p)).sum(dim=1)
    torch.testing.assert_close(plain["per_sample_loss"], by_hand, rtol=1e-4, atol=1e-6)
    assert torch.equal(model.last_replay_losses, plain["per_sample_loss"])
    assert torch.allclose(plain["loss"], plain["per_sample_loss"].mean())
    weights = torch.tensor([1.0, 0.0, 2.0, 0.0, 1.0, 0.0])
    weighted = model.training_step({"inputs": x, "slots": torch.arange(6), "weights": weights}, 0)
    assert torch.allclose(weighted["loss"], (weights * plain["per_sample_loss"]).mean())


def test_replay_batches_refuse_batch_targets_in_one_line(tmp_path):
    model = DistillationModule(teacher=tiny.make_net(0), student=tiny.make_net(1, width=4), export_filename=None,
                               target_source="batch")
    with pytest.raises(ZSKDError, match=r"^target_source='batch' .* replay-buffer batches .* carry none"):
        model.training_step({"inputs": torch.randn(2, *tiny.INPUT_SHAPE), "slots": torch.arange(2)}, 0)
    _, datamodule = tiny.online_setup()
    with pytest.raises(ZSKDError, match=r"^target_source='batch' .* replay-buffer batches .* carry none"):
        tiny.quiet_trainer(tmp_path).fit(model, datamodule=datamodule)  # at setup, before any warm-up round


def test_online_synthesis_refuses_a_precision_that_casts_the_teacher(tmp_path):
    model, datamodule = tiny.online_setup()
    with pytest.raises(ZSKDError, match="^Trainer precision '64-true' casts the teacher's weights"):
        tiny.quiet_trainer(tmp_path, precision="64-true").fit(model, datamodule=datamodule)


def test_online_synthesis_refuses_offline_data(tmp_path):
    model = DistillationModule(teacher=tiny.make_net(0), student=tiny.make_net(1, width=4), export_filename=None)
    datamodule = tiny.make_datamodule(tmp_path / "cache")
    assert isinstance(datamodule, ImpressionDataModule)
    trainer = tiny.quiet_trainer(tmp_path, callbacks=[OnlineSynthesis()])
    with pytest.raises(ZSKDError, match="OnlineSynthesis fills an OnlineDataModule's replay buffer; .* ImpressionDataModule"):
        trainer.fit(model, datamodule=datamodule)


# ------------------------------------------------------------------------------------- kill -9 and resume
def run_online(root: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = tiny.script_env(1)
    return subprocess.run([sys.executable, str(ONLINE_SCRIPT), "--root", str(root), *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_kill_9_mid_fit_then_resume_restores_the_buffer(tmp_path):
    last = tmp_path / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen([sys.executable, str(ONLINE_SCRIPT), "--root", str(tmp_path), "--steps", "40",
                             "--slow", "0.5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, env=tiny.script_env(1))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not last.exists() and proc.poll() is None:  # a crashed child: no wait
        time.sleep(0.2)
    time.sleep(1.5)  # a few more steps (and a newer checkpoint) before the kill
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert last.exists(), proc.stderr.read().decode()[-2000:]
    saved = torch.load(last, weights_only=True)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("OnlineSynthesis"))
    assert 0 < saved["global_step"] < 40

    seen = {}

    class Probe(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # before any round of this run
            if not seen:
                dm = trainer.datamodule
                seen.update(inputs=dm.buffer.inputs[: len(dm.buffer)].clone(),
                            labels=dm.buffer.labels[: len(dm.buffer)].clone(), step=trainer.global_step,
                            generator={k: v.clone() for k, v in dm.synthesizer.generator.state_dict().items()})

    model, datamodule = tiny.online_setup(steps_per_epoch=40)
    trainer = tiny.quiet_trainer(tmp_path, callbacks=[Probe()], enable_checkpointing=False)
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(last))
    assert seen["step"] == saved["global_step"]
    assert torch.equal(seen["inputs"], state["buffer"]["inputs"])
    assert torch.equal(seen["labels"], state["buffer"]["labels"])
    assert all(torch.equal(seen["generator"][k], v) for k, v in state["synthesizer"]["generator"].items())
    rounds_at_kill = state["rounds"]
    online = next(c for c in trainer.callbacks if isinstance(c, OnlineSynthesis))
    assert online.rounds > rounds_at_kill  # no warm-up again, and the schedule went on: one round per 2 steps
    assert online.rounds == 2 + (40 - 1) // 2


# ------------------------------------------------------------------------------------------------------ DDP
def test_two_processes_hold_one_buffer_made_of_rank_shares(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    for root, devices in ((two, "2"), (one, "1")):
        root.mkdir()
        proc = run_online(root, "--devices", devices, "--steps", "4", "--buffer", "96")
        assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(two / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # the documented rule: every process holds the same buffer and the same generator
    assert torch.equal(rank0["inputs"], rank1["inputs"]) and torch.equal(rank0["labels"], rank1["labels"])
    assert all(torch.equal(rank0["generator"][k], rank1["generator"][k]) for k in rank0["generator"])
    # rounds write 2 x 16 inputs (rank 0's share first); the first round's share of rank 0 is the one-process
    # first round (same start, same (seed, chunk 0) noise and classes)
    single = torch.load(one / "rank0.pt", weights_only=True)
    assert rank0["rounds"] == single["rounds"] == 2 + 1
    assert torch.equal(rank0["inputs"][:16], single["inputs"][:16])
    assert not torch.equal(rank0["inputs"][16:32], single["inputs"][16:32])  # rank 1's share: chunk 1, untrained


def assert_same_ends(expected_root: Path, resumed_root: Path, ranks: int = 1, priorities: bool = False) -> None:
    """Every rank of the two runs ended with the same round count, buffer, generator and student (and, where
    ``priorities``, which a priority sampler's runs must have, the same priorities)."""
    for rank in range(ranks):
        expected, resumed = (torch.load(root / f"rank{rank}.pt", weights_only=True)
                             for root in (expected_root, resumed_root))
        assert resumed["rounds"] == expected["rounds"]
        assert torch.equal(resumed["inputs"], expected["inputs"])
        for part in ("generator", "student"):
            assert all(torch.equal(resumed[part][k], v) for k, v in expected[part].items()), (rank, part)
        assert ("priorities" in resumed) == ("priorities" in expected)
        assert not priorities or "priorities" in expected
        assert "priorities" not in expected or torch.equal(resumed["priorities"], expected["priorities"])


@pytest.mark.parametrize("stop_at", [4, 6])  # at the end of epoch 1 of 2, and in the middle of epoch 2
def test_resumed_with_augmentation_and_dropout_ends_as_if_never_stopped(tmp_path, stop_at):
    """Blends, turns and noise draw from a stream per batch, whose count checkpoints keep, and the student's
    dropout from the global stream, which checkpoints keep too: a resumed run draws what an unstopped one did."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    outputs = []
    for root, args in ((whole, ()), (split, ("--stop-at", str(stop_at))), (split, ("--resume",))):
        root.mkdir(exist_ok=True)
        proc = run_online(root, "--steps", "4", "--epochs", "2", "--random", *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append(proc.stdout)
    assert f"DONE rank=0 steps={stop_at}" in outputs[1] and f"START rank=0 steps={stop_at}" in outputs[2]
    assert_same_ends(whole, split)


@pytest.mark.parametrize("fail, message", [("--fail-at", "the step failed"), ("--fail-in-round", "the round failed"),
                                           ("--fail-in-transfer", "the batch transfer failed"),
                                           ("--fail-in-round --synthesis-on-trainer", "the round failed")])
def test_a_checkpoint_saved_inside_a_failed_step_resumes_as_if_never_stopped(tmp_path, fail, message):
    """Step 4 raises after its round has written to the buffer and its forward pass has drawn (dropout), or inside
    that round, after the generator's update, or in its batch's transfer hooks after the augmentation drew (before
    Lightning counts the batch ready); the replay batch it was given was drawn before that round.
    ``OnExceptionCheckpoint`` saves there and the resumed fit redoes the step with that same batch (not one drawn
    again from the buffer the round changed), and a round cut short from the generator as the round found it:
    student, generator and buffer end as the unstopped run's. With the synthesis callback on the Trainer, its
    round runs before the module's callbacks record the batch's random states: the checkpoint holds those the
    previous batch left, not that batch's start."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    for root in (whole, split):
        root.mkdir()
    fail, *placement = fail.split()
    assert run_online(whole, "--steps", "8", "--random", *placement).returncode == 0
    failed = run_online(split, "--steps", "8", "--random", *placement, fail, "4")
    assert failed.returncode != 0 and message in failed.stderr
    resumed = run_online(split, "--steps", "8", "--random", *placement, "--resume", "--resume-from",
                         "on_exception.ckpt")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_ends(whole, split)


def test_a_ctrl_c_inside_a_held_block_arrives_when_the_block_ends():
    import signal

    from zskd_lightning.interrupts import interrupts_held

    # Python's own handler, as in a terminal (a shell without job control starts background jobs ignoring SIGINT)
    outside = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        ran = []
        with pytest.raises(KeyboardInterrupt):
            with interrupts_held():
                with interrupts_held():  # nested: the outer block holds it on
                    signal.raise_signal(signal.SIGINT)
                    ran.append("inner")
                ran.append("outer")
        assert ran == ["inner", "outer"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with interrupts_held():  # no signal: nothing raised
            ran.append("quiet")
        assert ran[-1] == "quiet" and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with interrupts_held():  # ignored: left alone
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, outside)


def test_a_ctrl_c_inside_the_buffer_write_waits_until_the_round_is_whole(tmp_path):
    """SSD-KD's class-balanced update writes the round input by input; a SIGINT after the second is held until
    the round is written and counted, so the checkpoint ``OnExceptionCheckpoint`` saves on the KeyboardInterrupt
    holds the whole round (not part of it under the old round count, which the resumed fit would decay and write
    again): the resumed run ends as the unstopped one, priorities included."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    for root in (whole, split):
        root.mkdir()
    assert run_online(whole, "--steps", "8", "--ssdkd").returncode == 0
    stopped = run_online(split, "--steps", "8", "--ssdkd", "--interrupt-in-write", "4")
    assert stopped.returncode == 1 and "KeyboardInterrupt" in stopped.stdout + stopped.stderr, stopped.stderr[-3000:]
    resumed = run_online(split, "--steps", "8", "--ssdkd", "--resume", "--resume-from", "on_exception.ckpt")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_ends(whole, split, priorities=True)


def test_a_failure_after_the_optimizers_step_keeps_the_steps_priorities(tmp_path):
    """Lightning counts a batch processed once its optimizer stepped; a failure in another callback's
    ``on_train_batch_end`` (a Ctrl-C at the progress bar's sync, on a GPU) then saves a checkpoint whose resumed
    fit does not redo the batch: its losses must already be in the sampler's priorities, so the resumed run ends
    as the unstopped one."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    for root in (whole, split):
        root.mkdir()
    assert run_online(whole, "--steps", "8", "--ssdkd").returncode == 0
    stopped = run_online(split, "--steps", "8", "--ssdkd", "--fail-after-step", "4")
    assert stopped.returncode != 0 and "the step's end failed" in stopped.stderr, stopped.stderr[-3000:]
    resumed = run_online(split, "--steps", "8", "--ssdkd", "--resume", "--resume-from", "on_exception.ckpt")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "START rank=0 steps=5" in resumed.stdout, resumed.stdout  # the batch of step 4 is not redone
    assert_same_ends(whole, split, priorities=True)


def same_state(a, b) -> bool:
    """Nested checkpoint states (dicts, lists, tuples, tensors, NumPy arrays) equal leaf by leaf."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same_state, a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if hasattr(a, "shape"):  # NumPy
        return bool((a == b).all())
    return a == b


def _checkpoint_at_step(tmp_path, steps: int = 3) -> None:
    """A tiny online fit of 6 steps an epoch, stopped at ``steps`` (3 or 6) with ``tmp_path/ckpt/last.ckpt``
    (2 warm-up rounds and one every 2 steps: 3 or 4 rounds)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    model, datamodule = tiny.online_setup(steps_per_epoch=6)
    every3 = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=3, save_top_k=0)
    tiny.quiet_trainer(tmp_path, max_steps=steps, enable_checkpointing=True, callbacks=[every3]).fit(
        model, datamodule=datamodule)


def test_a_checkpoint_saved_before_the_first_batch_of_a_resumed_fit_holds_what_was_loaded(tmp_path):
    """E.g. an error in ``on_train_start`` that ``OnExceptionCheckpoint`` saves: the replay loader's streams and
    the global random generators in it are those of the checkpoint resumed from, not fresh ones."""
    _checkpoint_at_step(tmp_path)

    class SaveAtStart(Callback):
        def on_train_start(self, trainer, pl_module):
            torch.manual_seed(7)  # the global streams a new process would start from
            trainer.save_checkpoint(tmp_path / "again.ckpt")

    model, datamodule = tiny.online_setup(steps_per_epoch=6)
    tiny.quiet_trainer(tmp_path, max_steps=4, callbacks=[SaveAtStart()]).fit(
        model, datamodule=datamodule, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    loaded, again = (torch.load(path, weights_only=False) for path in (tmp_path / "ckpt" / "last.ckpt",
                                                                        tmp_path / "again.ckpt"))
    loader = loaded["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader[0]["drawn"] == 3  # the replay loader's state, 3 batches into the epoch
    assert same_state(loader, again["loops"]["fit_loop"]["state_dict"]["combined_loader"])
    assert same_state(loaded["zskd_random_states"], again["zskd_random_states"])


@pytest.mark.parametrize("student", [(), ("--batchnorm",)], ids=["dropout", "batchnorm"])
def test_two_processes_resumed_mid_epoch_end_as_if_never_stopped(tmp_path, student):
    """Each rank draws its replay batches from its own stream; Lightning keeps rank 0's loader state only, so the
    loader gathers every rank's into it (and every rank's augmentation count and global generators go into the
    checkpoint). Stopped at step 4 of 8 and resumed, both ranks end with the student, generator and buffer of an
    uninterrupted run, augmentation and dropout included. With a BatchNorm student, the round before step 4 reads
    the student's running statistics, which each rank moved with its own batch and the checkpoint holds as rank
    0's: every round takes rank 0's."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    for root, args in ((whole, ()), (split, ("--stop-at", "4")), (split, ("--resume",))):
        root.mkdir(exist_ok=True)
        proc = run_online(root, "--devices", "2", "--steps", "8", "--buffer", "96", "--random", *student, *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        if args:  # it stopped at step 4, and resumed there, on both ranks
            expected = ("DONE" if args[0] == "--stop-at" else "START", 4)
            assert all(f"{expected[0]} rank={r} steps={expected[1]}" in proc.stdout for r in (0, 1)), proc.stdout
    assert_same_ends(whole, split, ranks=2)


def test_a_datamodule_reused_for_a_new_fit_starts_from_an_empty_buffer(tmp_path):
    """A new fit (no checkpoint) of a datamodule an earlier fit used: the buffer and the priority sampler (its
    annealed beta included) start afresh, so the fit ends as one with a new datamodule."""
    from zskd_lightning import PrioritySampler

    def fit(datamodule) -> None:
        model, _ = tiny.online_setup()  # a new student each fit
        tiny.quiet_trainer(tmp_path, max_steps=4).fit(model, datamodule=datamodule)

    _, reused = tiny.online_setup(sampler=PrioritySampler(), steps_per_epoch=4)
    _, new = tiny.online_setup(sampler=PrioritySampler(), steps_per_epoch=4)
    fit(reused)
    fit(reused)
    fit(new)
    synthesis = reused.synthesis_callbacks()[0]  # one callback for two fits (a Trainer's, or the lr finder's)
    model, _ = tiny.online_setup()
    tiny.quiet_trainer(tmp_path, max_steps=4, callbacks=[synthesis]).fit(model, datamodule=reused)
    assert synthesis.rounds == 3  # two warm-up rounds, one at step 2
    model, _ = tiny.online_setup()
    tiny.quiet_trainer(tmp_path, max_steps=4, callbacks=[synthesis]).fit(model, datamodule=reused)
    assert synthesis.rounds == 3
    assert reused.buffer.written == new.buffer.written and reused.sampler.draws == new.sampler.draws
    assert torch.equal(reused.buffer.inputs, new.buffer.inputs)
    assert np.array_equal(reused.sampler.tree.values(), new.sampler.tree.values())


def test_a_resume_that_stops_before_training_leaves_nothing_to_the_next_new_fit(tmp_path):
    """The loaded state waited for training to start: a resumed fit that stopped before it (a failed sanity check,
    Ctrl-C) left it, and the next new fit with that callback resumed the old buffer and generator instead."""
    _checkpoint_at_step(tmp_path, steps=6)

    class StopBeforeTraining(Callback):
        def on_fit_start(self, trainer, pl_module):
            raise RuntimeError("stopped before training")

    _, reused = tiny.online_setup(steps_per_epoch=6)
    synthesis = reused.synthesis_callbacks()[0]
    model, _ = tiny.online_setup()
    with pytest.raises(RuntimeError, match="stopped before training"):
        tiny.quiet_trainer(tmp_path, max_steps=4, callbacks=[synthesis, StopBeforeTraining()]).fit(
            model, datamodule=reused, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert synthesis.state_dict()["rounds"] == 4  # what was loaded, not yet applied, is what a save would keep
    model, _ = tiny.online_setup()
    tiny.quiet_trainer(tmp_path, max_steps=4, callbacks=[synthesis]).fit(model, datamodule=reused)
    _, new = tiny.online_setup(steps_per_epoch=6)
    model, _ = tiny.online_setup()
    tiny.quiet_trainer(tmp_path, max_steps=4).fit(model, datamodule=new)
    assert synthesis.rounds == 3  # two warm-up rounds, one at step 2: a new fit's (the checkpoint's 4, none more)
    assert reused.buffer.written == new.buffer.written and torch.equal(reused.buffer.inputs, new.buffer.inputs)


def test_replay_batches_are_augmented_on_their_device_while_training():
    from types import SimpleNamespace

    from zskd_lightning.augment import BatchAugmentation

    _, datamodule = tiny.online_setup()
    datamodule.batch_augmentation = BatchAugmentation(mix=1.0)
    batch = {"inputs": torch.randn(8, *tiny.INPUT_SHAPE), "slots": torch.arange(8)}
    datamodule.trainer = SimpleNamespace(training=False)
    assert datamodule.on_after_batch_transfer(batch, 0) is batch  # evaluation: untouched
    datamodule.trainer = SimpleNamespace(training=True, global_rank=0)
    global_stream = torch.get_rng_state()
    augmented = datamodule.on_after_batch_transfer(batch, 0)
    assert augmented["slots"] is batch["slots"] and augmented["inputs"].shape == batch["inputs"].shape
    assert not torch.equal(augmented["inputs"], batch["inputs"])
    assert torch.equal(torch.get_rng_state(), global_stream)  # its own stream: dropout's is left alone
    # each batch its own draws, keyed by the count of batches augmented (in checkpoints); rank 1 others
    second = datamodule.on_after_batch_transfer(batch, 0)["inputs"]
    assert not torch.equal(second, augmented["inputs"])
    datamodule.load_state_dict({**datamodule.state_dict(), "augmented_batches": 0})
    assert torch.equal(datamodule.on_after_batch_transfer(batch, 0)["inputs"], augmented["inputs"])
    datamodule.load_state_dict({**datamodule.state_dict(), "augmented_batches": 0})
    datamodule.trainer = SimpleNamespace(training=True, global_rank=1)
    assert not torch.equal(datamodule.on_after_batch_transfer(batch, 0)["inputs"], augmented["inputs"])


def test_a_balanced_buffer_without_per_sample_weights_stops_before_any_round(tmp_path):
    model, datamodule = tiny.online_setup(buffer_update="balanced")  # FastSynthesizer: no sample_weights
    with pytest.raises(ZSKDError, match="buffer_update='balanced' ranks new inputs by the method's per-sample"):
        tiny.quiet_trainer(tmp_path).fit(model, datamodule=datamodule)
    assert len(datamodule.buffer) == 0
