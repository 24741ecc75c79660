"""Attacks: the interface, the registry (one module per attack), the typed config block and the shared
evaluation."""
from ..registry import import_submodules
from .base import ATTACKS, Attack, mean_image_baseline, reconstruct, run_attack, transmitted
from .spec import AttackSpec, AttackSuite

import_submodules(__name__)


def create_attack(name: str, *, device=None, seed: int = 0, show_progress: bool = False, workdir=None, **params):
    """A registered attack with validated parameters, e.g. ``create_attack("inverse_network", epochs=2)``."""
    return ATTACKS.create(name, params, device=device or "cpu", seed=seed, show_progress=show_progress,
                          workdir=workdir)


__all__ = ["ATTACKS", "Attack", "create_attack", "AttackSpec", "AttackSuite", "mean_image_baseline", "reconstruct", "run_attack",
           "transmitted"]
