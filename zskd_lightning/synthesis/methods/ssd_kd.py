"""SSD-KD (Liu, Wang, Liu, Sun, Yao; "Small Scale Data-Free Knowledge Distillation", CVPR 2024, arXiv 2406.07876):
the online generator family with a modulating function phi = diversity x difficulty.

The authors' code is not public; the forms here are the standard ones the paper's description points to, and
each choice is documented where it is made:

- phi (:class:`~zskd_lightning.weighting.ModulatingFunction`) weights each input's generator objective (the
  cross-entropy; every regularizer, BatchNorm statistics, the adversarial, activation and balance terms and any
  input prior, is not weighted) (here), decides
  which buffer entries a round replaces (``OnlineDataModule(buffer_update="balanced")``), and weights each
  sample's distillation loss (``DistillationModule(sample_weights=ModulatingFunction())``);
- the student samples the buffer by priority (:class:`~zskd_lightning.online.PrioritySampler`).
"""

from __future__ import annotations

from typing import Any

from zskd_lightning.synthesis.methods.fast import FastSynthesizer
from zskd_lightning.weighting import ModulatingFunction


class SSDKDSynthesizer(FastSynthesizer):
    """:class:`~zskd_lightning.synthesis.FastSynthesizer`'s generator and terms, each input's objective (the
    cross-entropy) weighted by phi (``gamma``: the difficulty's focal exponent; ``temperature``: the one that
    softens the teacher's probabilities in it, default 20 as in
    :class:`~zskd_lightning.weighting.ModulatingFunction`; ``diversity`` / ``difficulty``: the parts, for
    ablations). ``fast_settings``: FastSynthesizer's and the generator engine's arguments."""

    identity_name = "ssd_kd"

    def __init__(self, gamma: float = 2.0, temperature: float = 20.0, diversity: bool = True, difficulty: bool = True,
                 **fast_settings: Any) -> None:
        phi = ModulatingFunction(gamma, temperature, diversity=diversity, difficulty=difficulty)
        super().__init__(sample_weights=phi, **fast_settings)
