"""Synthesis methods, one paper per file."""

from zskd_lightning.synthesis.methods.class_impressions import ClassImpressionSynthesizer
from zskd_lightning.synthesis.methods.fast import FastSynthesizer
from zskd_lightning.synthesis.methods.lopes2017 import LopesSynthesizer
from zskd_lightning.synthesis.methods.ssd_kd import SSDKDSynthesizer
from zskd_lightning.synthesis.methods.wang2021 import FeatureActivation, GaussianFeatureTargets, WangSynthesizer
from zskd_lightning.synthesis.methods.zskd import ZSKDSynthesizer

__all__ = ["ClassImpressionSynthesizer", "FastSynthesizer", "FeatureActivation", "GaussianFeatureTargets",
           "LopesSynthesizer", "SSDKDSynthesizer", "WangSynthesizer", "ZSKDSynthesizer"]
