"""The sweep file: one base config and a grid or list of overrides, validated like every other config.

The file is coerced into :class:`SweepSpec` (unknown fields and bad values named), then expanded into
:class:`SweepPoint` s, each a normal :class:`RunConfig` gone through ``config_from_dict`` (so its defense and
attacks are typed the same way as a run's). See docs/sweeps.md for the format.
"""
from __future__ import annotations

import copy
import itertools
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

from ...params import ConfigError, coerce, require
from ...registry import load_plugins
from ..config import (RunConfig, absolute_root, apply_override, config_from_dict, plugin_list, read_yaml_mapping,
                      root_relative_to)
from ...results.store import ResultsStore, is_finished


@dataclass
class SweepResources:
    cpus: float = 1      # CPUs per run (the Ray backend's request)
    gpus: float = 0      # GPUs per run

    def validate(self) -> None:
        require(self.cpus > 0, "cpus", "must be positive")
        require(self.gpus >= 0, "gpus", "must be >= 0")


@dataclass
class SweepSpec:
    """A sweep file as written: ``base`` and/or ``config``, then ``set`` (every point), ``points`` x ``grid``."""

    name: str | None = None
    description: str = ""
    base: str | None = None                       # a run config file, relative to the sweep file
    config: dict[str, Any] | None = None          # an inline run config (merged over base)
    set: dict[str, Any] = field(default_factory=dict)       # dotted overrides applied to every point
    points: list[Any] | None = None               # a list of dotted-override mappings
    grid: dict[str, Any] = field(default_factory=dict)      # dotted field -> list of values (crossed)
    out: str | None = None
    resources: SweepResources = field(default_factory=SweepResources)
    plugins: list[str] = field(default_factory=list)         # plug-in modules for every point

    def validate(self) -> None:
        require(self.points is None or (isinstance(self.points, list) and bool(self.points)), "points",
                "expected a non-empty list of override mappings")
        for i, p in enumerate(self.points or []):
            if p is not None and not isinstance(p, dict):
                raise ConfigError(f"points[{i}]: expected a mapping of dotted fields to values, e.g. {{defense.sigma: 0.1}}")
        for k, v in self.grid.items():
            require(isinstance(v, list) and bool(v), f"grid.{k}", "expected a non-empty list of values")


SWEEP_KEYS = tuple(f.name for f in fields(SweepSpec))


def parse_sweep(tree: dict) -> SweepSpec:
    """Validate a parsed sweep file (the same coercion as a run config; unknown fields named)."""
    unknown = sorted(set(tree) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"unknown sweep field '{unknown[0]}'; valid fields: {', '.join(SWEEP_KEYS)}")
    tree = dict(tree)
    for k in ("set", "grid"):   # written as `set:` with nothing under it
        if tree.get(k) is None:
            tree.pop(k, None)
    if tree.get("resources") is None:
        tree.pop("resources", None)
    if "plugins" in tree:
        tree["plugins"] = plugin_list(tree["plugins"])
    return coerce(SweepSpec, tree)


@dataclass
class SweepPoint:
    index: int
    overrides: dict[str, Any]          # the point's own dotted overrides (points entry + grid combination)
    config: RunConfig
    run_id: str

    @property
    def label(self) -> str:
        return " ".join(f"{k}={_short(v)}" for k, v in self.overrides.items()) or "(base)"


@dataclass
class Sweep:
    name: str
    points: list[SweepPoint]
    out: Path
    resources: dict[str, float] = field(default_factory=lambda: {"cpus": 1, "gpus": 0})
    description: str = ""
    source: Path | None = None

    def status(self) -> dict[str, str]:
        """run id -> store status ('pending' when the store has no row for it)."""
        path = self.out / "results.sqlite"
        rows = {r["run_id"]: r for r in ResultsStore(path).runs()} if path.exists() else {}
        out = {}
        for p in self.points:
            r = rows.get(p.run_id)
            st = r["status"] if r else "pending"
            if st == "finished" and not is_finished(r, self.out / p.run_id):   # its folder was deleted: redo
                st = "pending"
            out[p.run_id] = st
        return out


def _short(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "+".join(_short(x) for x in v)
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_short(x)}" for k, x in v.items()) + "}"
    return str(v)


def _apply(tree: dict, overrides: dict[str, Any], where: str) -> None:
    for k, v in overrides.items():
        try:
            apply_override(tree, f"{k}={json.dumps(v)}")
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None


def expand(tree: dict | SweepSpec) -> list[dict[str, Any]]:
    """The override sets of a sweep: every ``points`` entry crossed with every ``grid`` combination."""
    spec = tree if isinstance(tree, SweepSpec) else parse_sweep({k: tree[k] for k in ("points", "grid") if k in tree})
    points = [{str(k): v for k, v in (p or {}).items()} for p in (spec.points if spec.points is not None else [{}])]
    grid = {str(k): v for k, v in spec.grid.items()}
    keys = list(grid)
    combos = [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]
    return [{**p, **c} for p in points for c in combos]


def sweep_from_dict(tree: dict, source: Path | None = None, overrides: Iterable[str] = (),
                    out: str | Path | None = None) -> Sweep:
    """Build a sweep from its parsed file; ``overrides`` (``FIELD=VALUE``) apply to every point, last."""
    spec = parse_sweep(tree)
    load_plugins(spec.plugins)
    base: dict = {}
    if spec.base:
        base_path = Path(spec.base)
        if not base_path.is_absolute() and source is not None:
            base_path = source.parent / base_path
        base = root_relative_to(read_yaml_mapping(base_path, "base: config file"), base_path.parent)
    if spec.config:
        base = _merge(base, spec.config)
    if not base and not spec.base:
        raise ConfigError("a sweep needs `base: <run config file>` or an inline `config:`")
    if spec.plugins:   # the points carry them: a worker process imports them before reading its config
        base["plugins"] = list(dict.fromkeys(spec.plugins + plugin_list(base.get("plugins"))))
    name = str(spec.name or (source.stem if source else "sweep"))
    points: list[SweepPoint] = []
    seen: dict[str, int] = {}
    for i, ov in enumerate(expand(spec)):
        t = copy.deepcopy(base)
        _apply(t, spec.set, "set")
        _apply(t, ov, f"point {i} ({ov})")
        t["progress"] = False   # no per-run progress bars under a sweep (not part of the run id)
        root_relative_to(t, source.parent if source is not None else ".")  # a root set in the sweep file
        try:
            cfg = absolute_root(config_from_dict(t, list(overrides)))
            cfg.validate()
        except ConfigError as e:
            raise ConfigError(f"point {i} ({' '.join(f'{k}={_short(v)}' for k, v in ov.items())}): {e}") from None
        rid = cfg.run_id()
        if rid in seen:   # two override sets that resolve to the same config are one run
            continue
        seen[rid] = i
        points.append(SweepPoint(len(points), ov, cfg, rid))
    out_dir = Path(out) if out else Path(spec.out or Path("runs") / name)
    res = {k: (int(v) if float(v).is_integer() else v)
           for k, v in (("cpus", spec.resources.cpus), ("gpus", spec.resources.gpus))}
    return Sweep(name, points, out_dir, res, spec.description or "", source)


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_sweep(path: str | Path, overrides: Iterable[str] = (), out: str | Path | None = None) -> Sweep:
    path = Path(path)
    tree = read_yaml_mapping(path, "sweep file")
    try:
        return sweep_from_dict(tree, path, overrides, out)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
