"""Attacks: the interface, the registry (one module per attack), the typed config block and the shared
evaluation."""
from ..registry import import_submodules
from .base import ATTACKS, Attack, mean_image_baseline, reconstruct, run_attack, transmitted
from .spec import AttackSpec, AttackSuite

import_submodules(__name__)

__all__ = ["ATTACKS", "Attack", "AttackSpec", "AttackSuite", "mean_image_baseline", "reconstruct", "run_attack",
           "transmitted"]
