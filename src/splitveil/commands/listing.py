"""``splitveil list datasets|models|defenses|attacks``."""
from __future__ import annotations

from . import command


def registries():
    from ..attacks import ATTACKS
    from ..data import DATASETS
    from ..defenses import DEFENSES
    from ..models import MODELS

    return {"datasets": DATASETS, "models": MODELS, "defenses": DEFENSES, "attacks": ATTACKS}


@command("list", "list registered datasets, models, defenses or attacks with one-line descriptions")
class ListCommand:
    @staticmethod
    def add_arguments(p) -> None:
        p.add_argument("what", choices=["datasets", "models", "defenses", "attacks"])

    @staticmethod
    def handler(args) -> int:
        reg = registries()[args.what]
        items = reg.describe()
        width = max(len(k) for k in items)
        for name, doc in items.items():
            print(f"{name:<{width}}  {doc}")
        return 0
