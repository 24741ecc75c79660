"""Defenses: the plug-in interface, composition, the typed config block and the registry (one module per
defense)."""
from ..registry import import_submodules
from .base import DEFENSES, Defense, DefenseContext, DefenseStack, Edge, StepContext
from .spec import DefenseEntry, DefenseSpec, build_defenses

import_submodules(__name__)


def create_defense(name: str | list[str], **params) -> DefenseStack:
    """The defense stack of one registered defense (or an ``a+b`` composition) with validated parameters,
    e.g. ``create_defense("gaussian_noise", sigma=0.1)``; pass it to ``Trainer`` (which sets it up) and ``Edge``."""
    return build_defenses({"name": name, **params})


__all__ = ["DEFENSES", "Defense", "create_defense", "DefenseContext", "DefenseEntry", "DefenseSpec", "DefenseStack", "Edge",
           "StepContext", "build_defenses"]
