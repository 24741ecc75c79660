"""Attacks: the interface, the registry (one module per attack) and the shared evaluation."""
from ..registry import import_submodules
from .base import ATTACKS, Attack, mean_image_baseline, reconstruct, run_attack, transmitted

import_submodules(__name__)

__all__ = ["ATTACKS", "Attack", "mean_image_baseline", "reconstruct", "run_attack", "transmitted"]
