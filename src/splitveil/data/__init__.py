"""Datasets: registry, loaders and deterministic train/test/aux splits."""
from ..registry import import_submodules
from .base import DATASETS, DataBundle, ImageSplit, RawData
from .build import DataConfig, build_data

import_submodules(__name__)

__all__ = ["DATASETS", "DataBundle", "DataConfig", "ImageSplit", "RawData", "build_data"]
