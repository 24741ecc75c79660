"""A tiny name -> constructor registry shared by datasets, models, defenses and attacks."""
from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar

from .params import ConfigError, coerce

T = TypeVar("T")


class UnknownNameError(ConfigError, KeyError):
    """A name that no registry entry has (a ConfigError, and a KeyError for code that catches those)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def did_you_mean(name: str, known: list[str]) -> str:
    """`` (did you mean 'x'?)`` for a close registered name, else ''."""
    close = difflib.get_close_matches(str(name), known, n=2, cutoff=0.6)
    if not close and known:  # a prefix, e.g. vgg11 -> vgg11_bn
        close = [k for k in known if k.startswith(str(name)) or str(name).startswith(k)][:2]
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


class Registry(Generic[T]):
    """Maps registry names to objects (classes or factories) with a one-line description each."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._docs: dict[str, str] = {}

    def register(self, name: str, description: str | None = None) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            doc = description or (obj.__doc__ or "").strip().splitlines()[0:1]
            self._docs[name] = doc if isinstance(doc, str) else (doc[0] if doc else "")
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            raise UnknownNameError(self.unknown(name))
        return self._items[name]

    def unknown(self, name: str) -> str:
        """The message for an unknown ``name``: a close match, then every registered name (once)."""
        known = self.names()
        return f"unknown {self.kind} '{name}'{did_you_mean(name, known)}; registered: {', '.join(known) or '(none)'}"

    def create(self, name: str, params: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """``cls(validated params, **kwargs)`` for a registered class with a ``Params`` dataclass."""
        cls: Any = self.get(name)
        return cls(coerce(cls.Params, dict(params or {}), f"{self.kind}.{name}"), **kwargs)

    def describe(self) -> dict[str, str]:
        return {k: self._docs[k] for k in sorted(self._items)}

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)


def import_submodules(package_name: str) -> None:
    """Import every module of a package so that their @register decorators run.

    New defenses/attacks/models only need a new file: no central list to edit.
    """
    import importlib
    import pkgutil

    pkg = importlib.import_module(package_name)
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package_name}.{info.name}")


def create_attack(name: str, *, device: Any = "cpu", seed: int = 0, show_progress: bool = False,
                  workdir: Any = None, **params: Any) -> Any:
    """A registered attack with validated parameters, e.g. ``create_attack("inverse_network", epochs=2)``."""
    from .attacks import ATTACKS

    return ATTACKS.create(name, params, device=device, seed=seed, show_progress=show_progress, workdir=workdir)


def create_defense(name: str, **params: Any) -> Any:
    """The defense stack of one registered defense (or an ``a+b`` composition) with validated parameters,
    e.g. ``create_defense("gaussian_noise", sigma=0.1)``; pass it to ``Trainer`` and ``Edge``."""
    from .defenses import build_defenses

    return build_defenses({"name": name, **params})
