"""Offline impressions: the cache, the driver that fills it on every rank, the datamodule, and pictures.

Uses :mod:`zskd_lightning.synthesis` (never the reverse).
"""

from zskd_lightning.impressions.cache import ImpressionCache
from zskd_lightning.impressions.datamodule import ImpressionDataModule, ImpressionDataset
from zskd_lightning.impressions.driver import ImpressionPlan, ImpressionSynthesis, fill_cache
from zskd_lightning.impressions.pictures import save_impression_grid

__all__ = ["ImpressionCache", "ImpressionDataModule", "ImpressionDataset", "ImpressionPlan", "ImpressionSynthesis",
           "fill_cache", "save_impression_grid"]
