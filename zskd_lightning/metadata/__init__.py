"""Statistics a teacher's owner records on real data and ships with the model (Lopes et al. 2017)."""

from zskd_lightning.metadata.file import LayerRecord, Metadata, read_metadata, write_metadata
from zskd_lightning.metadata.statistics import ClassMoments

__all__ = ["ClassMoments", "LayerRecord", "Metadata", "read_metadata", "write_metadata"]
