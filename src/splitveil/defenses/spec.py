"""The typed ``defense`` block of a run config: which defenses, in which order, with which validated parameters.

A config writes ``{name: gaussian_noise, sigma: 0.1}`` or ``{name: [gaussian_noise, nopeek], sigma: 0.1,
alpha: 0.5}``, optionally with per-defense blocks ``{nopeek: {alpha: 3}}``. :meth:`DefenseSpec.from_config`
resolves it once, when the config is read (``config_from_dict``), into a :class:`DefenseSpec`: an ordered
tuple of :class:`DefenseEntry` (registry name, that defense's ``Params`` dataclass). Everything after that
(the run id, the label, the trainer's stack) reads the spec, never the raw mapping again.

Rules of the flat form:

- a flat key goes to the listed defense that declares it; a per-defense block wins over a flat value;
- a flat key declared by several listed defenses is ambiguous and an error naming them, unless every one of
  them lists the key in its ``shared_params`` (``sigma``: the noise and CEM's threshold are the same number
  by design; the CEM defenses then check that the noise actually added agrees with their sigma);
- a key that no listed defense declares is an error naming it.

``to_dict()`` gives back the block exactly as written, so config files and run ids do not change; the spec
is also a read-only mapping over that form, for code that still reads ``cfg.defense["name"]``.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Iterator

from ..params import ConfigError, coerce, field_names
from ..params import did_you_mean
from .base import DEFENSES, DefenseStack


@dataclass(frozen=True)
class DefenseEntry:
    """One defense of a spec: its registry name and its validated parameter dataclass."""

    name: str
    params: Any

    def build(self):
        return DEFENSES.get(self.name)(copy.deepcopy(self.params))


def _names(raw: Any) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, str):
        raw = [n.strip() for n in raw.replace("+", ",").split(",") if n.strip()]
    if not isinstance(raw, (list, tuple)) or not all(isinstance(n, str) for n in raw):
        raise ConfigError(f"defense.name: expected a name or a list of names, got {raw!r}")
    return [n for n in raw if n != "none"]


class DefenseSpec(Mapping):
    """A validated ``defense`` block: ``entries`` in stack order; build the stack with :meth:`build`."""

    def __init__(self, entries: tuple[DefenseEntry, ...] | list[DefenseEntry], raw: Mapping[str, Any] | None = None):
        self.entries = tuple(entries)
        self._raw = copy.deepcopy(dict(raw)) if raw is not None else (
            {"name": [e.name for e in self.entries] or "none", **{e.name: asdict(e.params) for e in self.entries}})

    # -- reading a config ----------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, value: Any, path: str = "defense") -> "DefenseSpec":
        """Validate a config's ``defense`` block (a mapping, or a spec already); errors name the field."""
        if isinstance(value, DefenseSpec):
            return value
        if value is None:
            value = {"name": "none"}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping such as {{name: gaussian_noise, sigma: 0.1}}, got {value!r}")
        raw = dict(value)
        spec = dict(raw)
        names = _names(spec.pop("name", None))
        for n in names:
            if n not in DEFENSES:
                raise ConfigError(f"{path}.name: {DEFENSES.unknown(n)}")
        per: dict[str, dict] = {n: {} for n in names}
        scoped = {k: spec.pop(k) for k in list(spec) if k in per}
        for n, block in scoped.items():
            if not isinstance(block, Mapping):
                raise ConfigError(f"{path}.{n}: expected a mapping of parameters, got {block!r}")
        for key, value_ in spec.items():
            declared = [n for n in names if key in field_names(DEFENSES.get(n).Params)]
            if not declared:
                if key in DEFENSES or key == "none":
                    raise ConfigError(f"{path}.{key}: parameters given for '{key}', which is not in {path}.name")
                valid = sorted({f for n in names for f in field_names(DEFENSES.get(n).Params)})
                raise ConfigError(f"unknown field '{path}.{key}'{did_you_mean(key, valid)} for defense(s) "
                                  f"{', '.join(names) or 'none'}; their parameters: {', '.join(valid) or '(none)'}")
            takers = [n for n in declared if key not in scoped.get(n, {})]   # a scoped value wins
            shared = all(key in getattr(DEFENSES.get(n), "shared_params", ()) for n in takers)
            if len(takers) > 1 and not shared:
                raise ConfigError(f"{path}.{key}: ambiguous: {' and '.join(takers)} both declare '{key}'; set it "
                                  f"per defense ({', '.join(f'{path}.{n}.{key}' for n in takers)})")
            for n in takers:
                per[n][key] = value_
        for n, block in scoped.items():
            per[n].update(block)
        entries = []
        for n in names:
            params_cls = DEFENSES.get(n).Params
            params = coerce(params_cls, per[n], f"{path}.{n}")
            _check_float32(params, lambda k, n=n: f"{path}.{n}.{k}" if k in scoped.get(n, {}) else f"{path}.{k}")
            entries.append(DefenseEntry(n, params))
        out = cls(entries, raw)
        out.build()   # the composition rules (conflicts, capabilities): a ConfigError now, not at training
        return out

    # -- what the rest of splitveil reads -------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries] or ["none"]

    @property
    def label(self) -> str:
        return "+".join(self.names)

    def params(self, name: str) -> Any | None:
        """The parameter dataclass of defense ``name`` in this spec (None if it is not listed)."""
        return next((e.params for e in self.entries if e.name == name), None)

    def resolved(self) -> dict[str, dict[str, Any]]:
        """``{name: every parameter with defaults filled in}`` in stack order (what the run id hashes)."""
        return {e.name: asdict(e.params) for e in self.entries}

    def build(self) -> DefenseStack:
        """A fresh defense stack (new modules) for this spec; the stack checks its composition rules."""
        return DefenseStack([e.build() for e in self.entries])

    def to_dict(self) -> dict[str, Any]:
        """The block as it was written (config.yaml keeps it, the run id is unchanged)."""
        return copy.deepcopy(self._raw)

    # -- a read-only mapping over the written form ----------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        return self._raw[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def __repr__(self) -> str:
        return f"DefenseSpec({', '.join(f'{e.name}={e.params!r}' for e in self.entries) or 'none'})"

    def __deepcopy__(self, memo: dict) -> "DefenseSpec":
        return DefenseSpec(self.entries, self._raw)


FLOAT32_MAX = 3.4028234663852886e38   # torch.finfo(torch.float32).max, without importing torch here


def _check_float32(params: Any, where) -> None:
    """Every number of a defense's parameters (also inside lists) is finite and representable in float32, the
    precision the defenses compute in: a ConfigError naming the field as written (``where(key)``) otherwise."""
    for key, value in vars(params).items():
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(v, float) and not (abs(v) <= FLOAT32_MAX):   # also NaN
                raise ConfigError(f"{where(key.rstrip('_'))}: {v!r} is not a finite float32 number (at most "
                                  f"{FLOAT32_MAX:.4g} in magnitude): the defense computes in float32")


def build_defenses(spec: Mapping[str, Any] | DefenseSpec | None) -> DefenseStack:
    """The defense stack of a config's ``defense`` block (a mapping or a :class:`DefenseSpec`).

    ``{name: gaussian_noise, sigma: 0.1}`` or ``{name: [gaussian_noise, nopeek], sigma: 0.1, alpha: 0.5}``; see
    :class:`DefenseSpec` for how flat and per-defense parameters are resolved.
    """
    return DefenseSpec.from_config(spec).build()
