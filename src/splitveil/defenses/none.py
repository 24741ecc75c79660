"""The undefended baseline."""
from .base import DEFENSES, Defense


@DEFENSES.register("none", "no defense: the raw encoder features are sent")
class NoDefense(Defense):
    """Sends the raw encoder features (the same as listing no defense)."""
