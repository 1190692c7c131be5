"""Datasets for training: ``Dataset`` (load, map, filter, encode, mix) and ``DatasetMeta``."""

from .dataset import Dataset
from .meta import DatasetMeta

__all__ = ["Dataset", "DatasetMeta"]
