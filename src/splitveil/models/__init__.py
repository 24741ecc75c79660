"""Architectures as ordered lists of named blocks, and ``split(model, cut)``."""
from ..registry import import_submodules
from .base import MODELS, BlockModel, ModelConfig, SplitModel, build_split_model, create_model, split

import_submodules(__name__)

__all__ = ["MODELS", "BlockModel", "ModelConfig", "SplitModel", "build_split_model", "create_model", "split"]
