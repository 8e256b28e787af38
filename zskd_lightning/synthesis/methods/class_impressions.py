"""Class Impressions (Mopuri et al., ECCV 2018): the ZSKD paper's baseline."""

from __future__ import annotations

from typing import Any

from zskd_lightning.synthesis.inversion import Synthesizer
from zskd_lightning.synthesis.objectives import SoftTargetCrossEntropy
from zskd_lightning.synthesis.targets import OneHotTargets


class ClassImpressionSynthesizer(Synthesizer):
    """One-hot targets: each impression is optimized to make the teacher predict its class.

    The objective is cross-entropy to the one-hot class at temperature ``temperature``, i.e. maximizing the
    class logit relative to the others (the raw logit alone is unbounded). Same loop and defaults as
    :class:`~zskd_lightning.ZSKDSynthesizer` (T = 20, lr 0.01, 1500 iterations) so the two differ only in their
    targets. ``synthesizer_settings``: the loop's settings (``iterations``, ``lr``, ``regularizers``, ...), see
    :class:`~zskd_lightning.synthesis.inversion.Synthesizer`; the CLI lists them as this class's own.
    """

    identity_name = "class_impressions"

    def __init__(self, temperature: float = 20.0, **synthesizer_settings: Any) -> None:
        super().__init__(target_sampler=OneHotTargets(), objective=SoftTargetCrossEntropy(temperature),
                         **synthesizer_settings)
