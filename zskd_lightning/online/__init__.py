"""Online synthesis: a generator fills a replay buffer during distillation (the FastDFKD family, SSD-KD).

Uses :mod:`zskd_lightning.synthesis` (never the reverse); the offline counterpart is
:mod:`zskd_lightning.impressions`.
"""

from zskd_lightning.online.buffer import ReplayBuffer
from zskd_lightning.online.datamodule import BufferBatches, OnlineDataModule
from zskd_lightning.online.driver import OnlineSynthesis
from zskd_lightning.online.priority import PrioritySampler, SumTree
from zskd_lightning.online.sampler import UniformSampler

__all__ = ["BufferBatches", "OnlineDataModule", "OnlineSynthesis", "PrioritySampler", "ReplayBuffer", "SumTree",
           "UniformSampler"]
