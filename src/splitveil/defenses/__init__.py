"""Defenses: the plug-in interface, composition, the typed config block and the registry (one module per
defense)."""
from ..registry import import_submodules
from .base import DEFENSES, Defense, DefenseContext, DefenseStack, Edge, StepContext
from .spec import DefenseEntry, DefenseSpec, build_defenses

import_submodules(__name__)

__all__ = ["DEFENSES", "Defense", "DefenseContext", "DefenseEntry", "DefenseSpec", "DefenseStack", "Edge",
           "StepContext", "build_defenses"]
