"""The typed ``attacks`` block of a run config: ``{name: {param: value}, ...}`` in the order the attacks run.

:meth:`AttackSuite.from_config` validates it once, when the config is read, into :class:`AttackSpec` entries
(registry name, that attack's ``Params`` dataclass); the run builds each attack with :meth:`AttackSpec.create`.
``to_dict()`` gives back the block as written (config files and run ids do not change); the suite is also a
read-only mapping over that form, for code that still reads ``cfg.attacks["inverse_network"]``.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Iterator

from ..params import ConfigError, coerce
from .base import ATTACKS, Attack


@dataclass(frozen=True)
class AttackSpec:
    """One attack of a run: its registry name and its validated parameter dataclass."""

    name: str
    params: Any

    def create(self, **kwargs: Any) -> Attack:
        """The attack object (``device``, ``seed``, ``show_progress``, ``workdir`` as keywords)."""
        return ATTACKS.get(self.name)(copy.deepcopy(self.params), **kwargs)


class AttackSuite(Mapping):
    """The validated attacks of a run, in config order."""

    def __init__(self, specs: tuple[AttackSpec, ...] | list[AttackSpec], raw: Mapping[str, Any] | None = None):
        self.specs = tuple(specs)
        self._raw = copy.deepcopy(dict(raw)) if raw is not None else {s.name: asdict(s.params) for s in self.specs}

    @classmethod
    def from_config(cls, value: Any, path: str = "attacks") -> "AttackSuite":
        if isinstance(value, AttackSuite):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping name -> parameters, got {value!r}")
        specs = []
        for name, params in value.items():
            if name not in ATTACKS:
                raise ConfigError(f"{path}.{name}: {ATTACKS.unknown(name)}")
            specs.append(AttackSpec(name, coerce(ATTACKS.get(name).Params, params or {}, f"{path}.{name}")))
        return cls(specs, value)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def params(self) -> dict[str, Any]:
        """``{name: its Params}`` in config order (copies: changing one changes nothing here)."""
        return {s.name: copy.deepcopy(s.params) for s in self.specs}

    def resolved(self) -> dict[str, dict[str, Any]]:
        """``{name: every parameter with defaults filled in}`` (what the run id hashes)."""
        return {s.name: asdict(s.params) for s in self.specs}

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._raw)

    def __getitem__(self, name: str) -> Any:
        return self._raw[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def __repr__(self) -> str:
        return f"AttackSuite({', '.join(f'{s.name}={s.params!r}' for s in self.specs)})"

    def __deepcopy__(self, memo: dict) -> "AttackSuite":
        return AttackSuite(self.specs, self._raw)
