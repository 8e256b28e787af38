"""Class Impressions (Mopuri et al., ECCV 2018): the ZSKD paper's baseline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from zskd_lightning.synthesis.base import Regularizer, Synthesizer
from zskd_lightning.synthesis.objectives import SoftTargetCrossEntropy
from zskd_lightning.synthesis.targets import OneHotTargets


class ClassImpressionSynthesizer(Synthesizer):
    """One-hot targets: each impression is optimized to make the teacher predict its class.

    The objective is cross-entropy to the one-hot class at temperature ``temperature``, i.e. maximizing the
    class logit relative to the others (the raw logit alone is unbounded). Same loop and defaults as
    :class:`~zskd_lightning.synthesis.zskd.ZSKDSynthesizer` (T = 20, lr 0.01, 1500 iterations) so the two
    differ only in their targets.
    """

    name = "class_impressions"

    def __init__(
        self,
        temperature: float = 20.0,
        iterations: int = 1500,
        lr: float = 0.01,
        init: Literal["uniform", "normal"] = "uniform",
        regularizers: Sequence[Regularizer] = (),
        stop_tolerance: float | None = None,
        stop_window: int = 50,
        channels_last: bool = True,
        fast_kernels: bool = True,
        precision: Literal["bf16-mixed", "32-true"] | None = None,
        jitter: int = 0,
    ) -> None:
        super().__init__(
            target_sampler=OneHotTargets(),
            objective=SoftTargetCrossEntropy(temperature),
            regularizers=regularizers,
            iterations=iterations,
            lr=lr,
            init=init,
            stop_tolerance=stop_tolerance,
            stop_window=stop_window,
            channels_last=channels_last,
            fast_kernels=fast_kernels,
            precision=precision,
            jitter=jitter,
        )
