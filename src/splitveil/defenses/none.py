"""The undefended baseline."""
from .base import DEFENSES, Defense


@DEFENSES.register("none", "no defense: the raw encoder features are sent")
class NoDefense(Defense):
    name = "none"
