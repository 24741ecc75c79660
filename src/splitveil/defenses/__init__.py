"""Defenses: the plug-in interface, composition and the registry (one module per defense)."""
from ..registry import import_submodules
from .base import DEFENSES, Defense, DefenseStack, Edge, StepContext, build_defenses

import_submodules(__name__)

__all__ = ["DEFENSES", "Defense", "DefenseStack", "Edge", "StepContext", "build_defenses"]
