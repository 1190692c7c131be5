"""Datasets for training: ``Dataset`` (load, map, filter, encode, mix) and ``DatasetMeta``."""

from ..protocol.dataset_meta import DatasetMeta
from .dataset import Dataset

__all__ = ["Dataset", "DatasetMeta"]
