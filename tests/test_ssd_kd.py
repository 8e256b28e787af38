"""SSD-KD's parts: the modulating function, prioritized replay, the balanced partial update, resumed priorities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import tiny
from helpers.tiny import one_torch_thread  # noqa: F401  (module fixture: one torch thread)
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from zskd_lightning import ModulatingFunction, PrioritySampler, ReplayBuffer, SSDKDSynthesizer
from zskd_lightning.errors import InvalidArgument, ZSKDError
from zskd_lightning.online import SumTree
from zskd_lightning.weighting import ClassDiversity, TeacherUncertainty


def logits_for(classes: list[int], num_classes: int = 2, confidence: float = 0.9) -> torch.Tensor:
    """Logits whose softmax puts ``confidence`` on each listed class (two classes)."""
    p = torch.full((len(classes), num_classes), (1 - confidence) / (num_classes - 1))
    p[torch.arange(len(classes)), torch.tensor(classes)] = confidence
    return p.log()


# -------------------------------------------------------------------------------------------------------- phi
def test_difficulty_by_hand():
    # p_T = (0.9, 0.1): (1 - 0.9)^2 = 0.01; p_T = (0.5, 0.5): 0.25
    logits = torch.tensor([[math.log(0.9), math.log(0.1)], [0.0, 0.0]])
    assert torch.allclose(TeacherUncertainty(gamma=2.0)(logits), torch.tensor([0.01, 0.25]), atol=1e-6)
    # at T = 2, p_T = (3, 1) / 4 (square roots of 0.9 and 0.1, normalized): (1 - 0.75)^2 = 0.0625
    assert torch.allclose(TeacherUncertainty(2.0, temperature=2.0)(logits), torch.tensor([0.0625, 0.25]), atol=1e-6)
    phi = SSDKDSynthesizer(gamma=2.0, temperature=2.0).sample_weights
    assert (phi.difficulty.gamma, phi.difficulty.temperature) == (2.0, 2.0)


def test_diversity_by_hand():
    diversity = ClassDiversity()
    # batch predicts 0, 0, 0, 1: m = (3, 1), M = 4: class 0 (4 + 2) / (2 * 4) = 0.75, class 1 6 / (2 * 2) = 1.5
    assert torch.allclose(diversity(logits_for([0, 0, 0, 1])), torch.tensor([0.75, 0.75, 0.75, 1.5]))
    diversity.observe(torch.tensor([1, 3]))  # the buffer leans the other way: m = (4, 4), every d = 10 / 10
    assert torch.allclose(diversity(logits_for([0, 0, 0, 1])), torch.ones(4))


def test_modulating_function_is_the_product_and_normalizes_to_mean_one():
    logits = logits_for([0, 0, 0, 1]) + torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    product = TeacherUncertainty(2.0)(logits) * ClassDiversity()(logits)
    assert torch.allclose(ModulatingFunction(2.0, 1.0, normalize=False)(logits), product)
    phi = ModulatingFunction(2.0, 1.0)(logits)
    assert torch.allclose(phi, product / product.mean()) and abs(float(phi.mean()) - 1) < 1e-6
    assert torch.allclose(ModulatingFunction(diversity=False, normalize=False)(logits),
                          TeacherUncertainty(2.0, temperature=20.0)(logits))
    assert SSDKDSynthesizer().sample_weights.difficulty.temperature == 20.0  # the distillation temperature


# ------------------------------------------------------------------------------------------ priority sampling
def test_sum_tree_finds_prefix_intervals():
    tree = SumTree(5)
    tree.set(np.arange(5), np.array([1.0, 0.0, 2.0, 3.0, 4.0]))
    assert tree.total == 10.0
    assert tree.find(np.array([0.0, 0.99, 1.0, 2.99, 3.0, 5.99, 6.0, 9.99])).tolist() == [0, 0, 2, 2, 3, 3, 4, 4]
    tree.set(np.array([4]), np.array([0.5]))
    assert tree.total == 6.5
    tree.set(np.array([1, 3, 1, 3, 1]), np.array([7.0, 8.0, 9.0, 0.25, 0.75]))  # repeated slots: each one's last
    assert tree.values().tolist() == [1.0, 0.75, 2.0, 0.25, 0.5] and tree.total == 4.5


def test_probabilities_before_any_priority_are_uniform_and_an_empty_buffer_is_refused():
    """They divided by a zero total: NaN for every entry, silently."""
    sampler = PrioritySampler()
    sampler.setup(8)
    assert sampler.probabilities(4).tolist() == [0.25] * 4
    with pytest.raises(InvalidArgument, match=r"^probabilities of the first 0 entries: size must be >= 1$"):
        sampler.probabilities(0)


def test_sampler_frequencies_match_the_probabilities_within_3_standard_errors():
    sampler = PrioritySampler(alpha=0.7, beta=0.4)
    size = 50
    sampler.setup(size)
    losses = torch.linspace(0.0, 5.0, size) ** 2
    sampler.update(torch.arange(size), losses)
    expected = sampler.probabilities(size).numpy()
    assert np.allclose(expected, (losses.double().numpy() + sampler.eps) ** 0.7
                       / ((losses.double().numpy() + sampler.eps) ** 0.7).sum())
    generator = torch.Generator().manual_seed(0)
    draws = np.concatenate([sampler.draw(size, 250, generator)[0].numpy() for _ in range(400)])  # 100,000 draws
    frequency = np.bincount(draws, minlength=size) / len(draws)
    standard_error = np.sqrt(expected * (1 - expected) / len(draws))
    assert np.all(np.abs(frequency - expected) <= 3 * standard_error + 1e-12)


def test_importance_weights_by_hand():
    sampler = PrioritySampler(alpha=1.0, beta=1.0, eps=1e-9)
    sampler.setup(2)
    sampler.update(torch.tensor([0, 1]), torch.tensor([1.0, 3.0]))  # P = (0.25, 0.75)
    # (N P)^-1 = (2, 2/3), divided by the batch's largest: (1, 1/3); a batch of the likelier entry alone: (1, 1)
    assert torch.allclose(sampler.importance_weights(torch.tensor([0, 1]), 2), torch.tensor([1.0, 1.0 / 3.0]))
    assert torch.allclose(sampler.importance_weights(torch.tensor([1, 1]), 2), torch.ones(2))
    sampler.beta = 0.5  # (2^0.5, (2/3)^0.5) / 2^0.5
    assert torch.allclose(sampler.importance_weights(torch.tensor([0, 1]), 2),
                          torch.tensor([1.0, (1 / 3) ** 0.5]), atol=1e-6)
    slots, weights = sampler.draw(2, 2, torch.Generator().manual_seed(0))
    assert torch.allclose(weights, sampler.importance_weights(slots, 2))
    annealed = PrioritySampler(beta=0.4, beta_steps=10)
    annealed.draws = 5
    assert annealed.current_beta == pytest.approx(0.7)
    annealed.draws = 50
    assert annealed.current_beta == 1.0


def test_beta_anneals_over_the_fit_by_default():
    """Without ``beta_steps`` beta reaches 1 at the fit's last batch (as the driver tells it at the fit's start); a
    fit without an end keeps beta, with a warning."""
    sampler = PrioritySampler(beta=0.4)
    assert sampler.current_beta == 0.4  # no fit told yet
    sampler.plan(21)  # the last batch's weights come after 20 draws
    sampler.draws = 10
    assert sampler.current_beta == pytest.approx(0.7)
    sampler.draws = 20
    assert sampler.current_beta == 1.0
    with pytest.warns(UserWarning, match="no known number of batches .* beta stays 0.4"):
        sampler.plan(None)
    assert sampler.current_beta == 0.4
    sampler.plan(1)
    assert sampler.current_beta == 1.0  # one batch: the fit's end
    fixed = PrioritySampler(beta=0.4, beta_steps=40)
    fixed.plan(20)
    fixed.draws = 20
    assert fixed.current_beta == pytest.approx(0.7)  # beta_steps given: the fit's length does not count
    with pytest.raises(InvalidArgument, match="beta_steps >= 1"):
        PrioritySampler(beta_steps=0)


def test_new_entries_get_the_largest_priority_seen():
    sampler = PrioritySampler(alpha=1.0, eps=1e-9)
    sampler.setup(4)
    sampler.update(torch.tensor([0, 1]), torch.tensor([0.5, 7.0]))
    sampler.written(torch.tensor([2]))
    assert sampler.tree.values()[2] == pytest.approx(7.0)


# --------------------------------------------------------------------------------------- balanced update
def test_the_buffer_stays_class_balanced_under_the_partial_update():
    generator = torch.Generator().manual_seed(0)
    buffer, num_classes = ReplayBuffer(40, (1, 2, 2)), 4
    share = math.ceil(40 / num_classes)
    replaced = []
    for round_index in range(30):
        labels = torch.multinomial(torch.tensor([0.7, 0.1, 0.1, 0.1]), 16, replacement=True, generator=generator)
        scores = torch.rand(16, generator=generator)
        slots = buffer.write_balanced(torch.randn(16, 1, 2, 2), labels, scores, num_classes, decay=0.9)
        counts = buffer.class_counts(num_classes)
        assert int(counts.max()) <= share, (round_index, counts)
        replaced.append(len(slots))
    assert len(buffer) == 40 and buffer.class_counts(num_classes).tolist() == [share] * num_classes
    assert min(replaced[10:]) < 16  # partial: later rounds replace only part of the buffer's entries
    with pytest.raises(InvalidArgument):
        buffer.write_balanced(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), torch.ones(2), num_classes)


def test_a_higher_score_replaces_the_weakest_entry_of_its_own_class():
    buffer = ReplayBuffer(4, (1,))
    buffer.write_balanced(torch.tensor([[0.0], [1.0], [2.0], [3.0]]), torch.tensor([0, 0, 1, 1]),
                          torch.tensor([0.5, 0.2, 0.9, 0.8]), num_classes=2)
    slots = buffer.write_balanced(torch.tensor([[9.0], [8.0]]), torch.tensor([0, 1]), torch.tensor([0.3, 0.1]),
                                  num_classes=2)
    # the first round fills best first: slots hold inputs 2, 3, 0, 1 (scores 0.9, 0.8, 0.5, 0.2)
    assert slots.tolist() == [3]  # 0.3 beats class 0's weakest (0.2); class 1's weakest (0.8) holds against 0.1
    assert buffer.inputs.flatten().tolist() == [2.0, 3.0, 0.0, 9.0]
    assert buffer.scores.tolist() == pytest.approx([0.9, 0.8, 0.5, 0.3])


def test_an_uneven_share_keeps_the_score_check():
    """Capacity 10 over 3 classes (a share of 3.33): a class held 3 times is below its share, but taking a slot
    from the class held 4 times would only swap which class is over; the new input must out-score its own class."""
    buffer = ReplayBuffer(10, (1,))
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    buffer.write_balanced(torch.arange(10.0)[:, None], labels, torch.ones(10), num_classes=3)
    assert buffer.class_counts(3).tolist() == [4, 3, 3]
    held = buffer.inputs.clone()
    assert buffer.write_balanced(torch.tensor([[50.0]]), torch.tensor([1]), torch.tensor([0.5]), 3).tolist() == []
    assert torch.equal(buffer.inputs, held)
    slots = buffer.write_balanced(torch.tensor([[60.0]]), torch.tensor([1]), torch.tensor([2.0]), 3)
    assert buffer.labels[slots].tolist() == [1] and buffer.class_counts(3).tolist() == [4, 3, 3]


def test_a_class_with_no_entry_competes_with_the_most_held_one():
    buffer = ReplayBuffer(3, (1,))  # fewer slots than classes: a share of 0.3
    buffer.write_balanced(torch.zeros(3, 1), torch.tensor([0, 1, 2]), torch.tensor([0.9, 0.5, 0.8]), num_classes=10)
    assert buffer.write_balanced(torch.ones(1, 1), torch.tensor([5]), torch.tensor([0.1]), 10).tolist() == []
    slots = buffer.write_balanced(torch.ones(1, 1), torch.tensor([5]), torch.tensor([0.95]), 10)
    # filled best first (labels 0, 2, 1); class 0 is the most held (ties: the lowest index), its entry scores 0.9
    assert buffer.labels.tolist() == [5, 2, 1] and slots.tolist() == [0]


def test_balanced_writes_refuse_labels_outside_the_classes_in_one_line():
    buffer = ReplayBuffer(4, (1,))
    for bad in (torch.tensor([0, 3]), torch.tensor([-1, 0])):
        with pytest.raises(InvalidArgument,
                           match=r"^labels written to the buffer must be in \[0, 3\), got -?\d\.\.\d$"):
            buffer.write_balanced(torch.zeros(2, 1), bad, torch.ones(2), num_classes=3)
    assert len(buffer) == 0


def test_the_buffer_counts_the_teachers_predictions_apart_from_its_labels():
    buffer = ReplayBuffer(6, (1,))
    buffer.add(torch.zeros(4, 1), torch.tensor([0, 1, 2, 0]), predicted=torch.tensor([1, 1, 1, 0]))
    buffer.write_balanced(torch.zeros(2, 1), torch.tensor([1, 2]), torch.ones(2), 3, predicted=torch.tensor([2, 2]))
    assert buffer.class_counts(3).tolist() == [2, 2, 2] and buffer.predicted_counts(3).tolist() == [1, 3, 2]
    buffer.add(torch.zeros(1, 1), torch.tensor([0]))  # slot 4 (the ring's next); no predictions: the label stands
    restored = ReplayBuffer(6, (1,))
    restored.load_state_dict(buffer.state_dict())
    assert restored.predicted.tolist() == buffer.predicted.tolist() == [1, 1, 1, 0, 0, 2]
    older = {k: v for k, v in buffer.state_dict().items() if k != "predicted"}  # a checkpoint of earlier code
    restored.load_state_dict(older)
    assert torch.equal(restored.predicted, restored.labels)
    with pytest.raises(InvalidArgument, match="predicted classes \\[3\\]"):
        buffer.add(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), predicted=torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("moves", [{}, {"augment_shift": 2, "augment_flip": True}], ids=["unmoved", "moved"])
def test_the_diversity_part_counts_the_teachers_predictions_in_the_buffer(tmp_path, moves):
    """SSD-KD's diversity part weighs a sample by how many buffer entries the teacher predicts as its class: the
    counts observed before each round are the buffer's predicted classes, not the classes its inputs were made for.
    With FastDFKD's moves the predictions are still those of the entries the buffer holds, not of their moved
    copies."""
    model, datamodule = tiny.online_setup(steps_per_epoch=6, synthesizer=SSDKDSynthesizer, **moves)
    observed = []

    class Recording(ModulatingFunction):
        def observe(self, counts):
            buffer = datamodule.buffer
            observed.append((counts.clone(), buffer.predicted_counts(len(counts)), buffer.class_counts(len(counts))))
            super().observe(counts)

    model.sample_weights = Recording()
    tiny.quiet_trainer(tmp_path, max_steps=6).fit(model, datamodule=datamodule)
    buffer, held = datamodule.buffer, len(datamodule.buffer)
    with torch.no_grad():
        assert torch.equal(buffer.predicted[:held], model.teacher(buffer.inputs[:held]).argmax(dim=-1))
    assert len(observed) >= 3 and all(torch.equal(counts, predicted) for counts, predicted, _ in observed)
    assert any(not torch.equal(predicted, labels) for _, predicted, labels in observed[1:])  # they differ here


# ------------------------------------------------------------------------------------------------ resumed run
def test_a_resumed_run_keeps_its_priorities_and_class_counts(tmp_path):
    def setup():
        model, datamodule = tiny.online_setup(steps_per_epoch=6, synthesizer=SSDKDSynthesizer,
                                              sampler=PrioritySampler(), buffer_update="balanced")
        model.sample_weights = ModulatingFunction()
        return model, datamodule

    model, datamodule = setup()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=6, save_top_k=0)
    tiny.quiet_trainer(tmp_path, max_steps=6, enable_checkpointing=True, callbacks=[checkpoint]).fit(
        model, datamodule=datamodule)
    assert datamodule.sampler.fit_batches == 6 and datamodule.sampler.current_beta == 1.0  # annealed over the fit
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("OnlineSynthesis"))
    assert state["sampler"]["draws"] == 6  # the weights of the last batch came after 5: at beta 1
    leaves = state["sampler"]["leaves"]
    assert torch.equal(leaves, torch.from_numpy(datamodule.sampler.tree.values()))
    assert len(set(leaves.tolist())) > 3  # real, varied priorities from the distillation losses
    observed = model.sample_weights.diversity.counts  # the buffer's classes at the last round (step 4)
    assert observed is not None and torch.equal(state["observed_counts"], observed)
    seen = {}

    class Probe(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # before this step's round
            seen.setdefault("leaves", torch.from_numpy(trainer.datamodule.sampler.tree.values()))
            seen.setdefault("counts", pl_module.sample_weights.diversity.counts)
            seen.setdefault("beta", trainer.datamodule.sampler.current_beta)

    model, datamodule = setup()
    tiny.quiet_trainer(tmp_path, max_steps=10, max_epochs=2, callbacks=[Probe()]).fit(
        model, datamodule=datamodule, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert torch.equal(seen["leaves"], leaves)
    assert seen["counts"] is not None and torch.equal(seen["counts"], observed)  # phi weighs as before the stop
    assert seen["beta"] == pytest.approx(0.4 + 0.6 * 7 / 9)  # 6 draws saved and this step's own; 1 at the 10th


def test_the_fit_length_counts_epochs_steps_and_accumulation():
    from types import SimpleNamespace

    from zskd_lightning.online.driver import _fit_batches

    def trainer(epochs, per_epoch, max_steps=-1, accumulate=1):
        return SimpleNamespace(max_epochs=epochs, num_training_batches=per_epoch, max_steps=max_steps,
                               accumulate_grad_batches=accumulate)

    assert _fit_batches(trainer(3, 7, accumulate=2)) == 21  # every epoch's batches, whatever the accumulation
    # 7 batches an epoch in steps of 2 (the 4th step takes the epoch's last batch alone): 5 steps are 7 + 2
    assert _fit_batches(trainer(3, 7, max_steps=5, accumulate=2)) == 9
    assert _fit_batches(trainer(3, 8, max_steps=5, accumulate=2)) == 10
    assert _fit_batches(trainer(-1, 7, max_steps=4)) == 4
    assert _fit_batches(trainer(-1, float("inf"), max_steps=4)) == 4  # a loader without a length
    assert _fit_batches(trainer(-1, 7)) is None  # no end


def test_samplers_refuse_each_others_states_in_one_line():
    from zskd_lightning.online import UniformSampler

    sampler = PrioritySampler()
    sampler.setup(16)
    with pytest.raises(ZSKDError, match=r"^the checkpoint's replay buffer has no priorities .*UniformSampler"):
        sampler.load_state_dict(UniformSampler().state_dict())
    sampler.written(torch.arange(4))
    with pytest.raises(ZSKDError, match=r"^the checkpoint's replay buffer was drawn by a sampler with a state "
                                        r"\(\['draws', 'leaves', 'max_priority'\].*not UniformSampler$"):
        UniformSampler().load_state_dict(sampler.state_dict())  # its priorities would be dropped


def test_loss_feedback_skips_entries_a_round_rewrote_after_the_batch_was_drawn(tmp_path):
    """A batch is drawn before its step's round (Lightning fetches a sized loader's batches without prefetch): the
    losses of entries rewritten since belong to inputs the buffer no longer holds, so they must not set the new inputs'
    priorities (which stay the largest seen until the new inputs are drawn themselves)."""
    drawn, fed, rewritten = {}, [], []

    class RecordingSampler(PrioritySampler):
        def update(self, slots, losses):
            buffer = datamodule.buffer
            step = len(fed)
            held = buffer.inputs[drawn[step]["slots"]]
            same = torch.tensor([torch.equal(a, b) for a, b in zip(held, drawn[step]["inputs"])])
            rewritten.append(int((~same).sum()))
            fed.append(sorted(slots.tolist()))
            assert sorted(drawn[step]["slots"][same].tolist()) == fed[-1]  # the inputs the batch saw, only
            super().update(slots, losses)

    class Probe(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # before this step's round
            drawn[trainer.global_step] = {"slots": batch["slots"].clone(), "inputs": batch["inputs"].clone()}

    model, datamodule = tiny.online_setup(steps_per_epoch=12, buffer_size=24, sampler=RecordingSampler())
    tiny.quiet_trainer(tmp_path, callbacks=[Probe()]).fit(model, datamodule=datamodule)
    assert len(fed) == 12 and sum(rewritten) > 0  # the case arose: rounds rewrote entries of drawn batches
