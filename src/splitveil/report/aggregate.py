"""Grouping of finished runs over seeds: mean and (sample) standard deviation per metric, the fields a sweep
varied, and the Pareto front of the accuracy-vs-attack-MSE trade-off."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..results.records import EXCLUDING_FLAGS, IMAGE_METRICS, RunRecord, flag_text
from ..results.store import open_store, results_paths
from .results import run_summary

# config fields that never define a group (seeds are what a group averages over)
IGNORED_FIELDS = {"name", "seed", "progress", "device", "threads", "data.root", "data.cache", "defense.name"}
# device and threads change how a run computes (and its float rounding), not what it measures: runs differing only
# there are seeds of one group


@dataclass
class GroupedRun:
    """One finished run as the report groups it: its typed record (``record``), flattened config and flat numeric
    values."""
    run_id: str
    dataset: str
    model: str
    cut: str
    defense: str
    seed: int
    metrics: dict[str, Any]
    config: dict[str, Any]              # flattened, dotted keys
    run_dir: Path | None
    values: dict[str, float]            # flat numeric metrics (accuracy, <attack>.mse, worst.mse, cem.snr, ...)
    flags: list[str] = field(default_factory=list)          # weak_attack, chance_accuracy, ...
    worst_attack: dict[str, str | None] = field(default_factory=dict)  # metric -> attack giving the worst case
    name: str = ""

    @property
    def record(self) -> RunRecord:
        """The run's metrics as a typed record."""
        return RunRecord.from_dict(self.metrics)

    @property
    def excluded(self) -> list[str]:
        """The flags that keep this run out of Pareto fronts, equal-utility frontiers and gains
        (:data:`~splitveil.results.records.EXCLUDING_FLAGS`: its privacy number measures no defense)."""
        return excluding(self.flags)


def excluding(flags: list[str] | None) -> list[str]:
    """The flags of ``flags`` that exclude a run from fronts, frontiers and gains."""
    return [f for f in flags or [] if f in EXCLUDING_FLAGS]


@dataclass
class Group:
    dataset: str
    model: str
    cut: str
    defense: str
    params: dict[str, Any]              # the varied fields (besides defense and seed) that define this group
    runs: list[GroupedRun] = field(default_factory=list)
    label_fields: list[str] | None = None   # fields named in ``label`` (default: all params); the report sets
                                            # the ones that vary within a dataset section

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def seeds(self) -> list[int]:
        return sorted(r.seed for r in self.runs)

    @property
    def label(self) -> str:
        keys = self.params if self.label_fields is None else [k for k in self.params if k in self.label_fields]
        extra = " ".join(f"{k.split('.')[-1]}={_fmt_param(self.params[k])}" for k in keys if self.params[k] is not None)
        return f"{self.defense} {extra}".strip()

    @property
    def flags(self) -> list[str]:
        """Every flag raised by any of the group's runs (a group with one weak seed is shown as weak)."""
        out: list[str] = []
        for r in self.runs:
            out += [f for f in r.flags if f not in out]
        return out

    @property
    def kept_runs(self) -> list[GroupedRun]:
        """The runs that may enter a Pareto front, a frontier or a gain (no excluding flag)."""
        return [r for r in self.runs if not excluding(r.flags)]

    def kept(self) -> "Group | None":
        """This group with its excluded runs left out (itself when none is; None when every run is excluded): what
        fronts, frontiers and gains are computed from."""
        runs = self.kept_runs
        if len(runs) == len(self.runs):
            return self
        if not runs:
            return None
        return Group(self.dataset, self.model, self.cut, self.defense, self.params, runs, self.label_fields)

    def exclusion(self) -> str:
        """Which runs are kept out of fronts, frontiers and gains, and why ('' when none), e.g.
        ``seed 1 (chance accuracy)``."""
        return "; ".join(f"seed {r.seed} ({flag_text(excluding(r.flags))})" for r in self.runs if excluding(r.flags))

    def worst_attacks(self, metric: str = "mse") -> list[str]:
        """The attacks that gave the worst case of ``metric`` in this group's runs (one per seed, deduplicated)."""
        out: list[str] = []
        for r in self.runs:
            a = r.worst_attack.get(metric)
            if a and a not in out:
                out.append(a)
        return out

    def stat(self, metric: str) -> tuple[float | None, float | None]:
        """(mean, sample std with n-1; None for a single run) of ``metric`` over this group's runs."""
        vals = [r.values[metric] for r in self.runs if r.values.get(metric) is not None]
        return mean_std(vals)


def mean_std(vals: list[float]) -> tuple[float | None, float | None]:
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def _fmt_param(v: Any) -> str:
    if isinstance(v, list):
        return "+".join(map(str, v))
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def flatten_config(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (tree or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten_config(v, key + "."))
        else:
            out[key] = v
    return out


def load_runs(results: str | Path) -> list[GroupedRun]:
    """Every finished run of a store, with its flattened config and numeric metrics."""
    folder, _ = results_paths(results)
    out = []
    for row in open_store(results).runs("finished"):
        rec = RunRecord.from_dict(row.get("metrics"))
        flat = run_summary(row)
        values = {k: float(v) for k, v in flat.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("seed",)}
        worst = {k: rec.worst().best(k)[0] for k in IMAGE_METRICS}
        run_dir = folder / row["run_id"]
        if not run_dir.exists() and row.get("run_dir"):
            run_dir = Path(row["run_dir"])
        out.append(GroupedRun(row["run_id"], rec.dataset or row["dataset"], rec.model or row["model"],
                              str(rec.cut if rec.cut is not None else row["cut"]), rec.defense or row["defense"],
                              int(row["seed"]), row.get("metrics") or {}, flatten_config(row.get("config") or {}),
                              run_dir if run_dir.exists() else None, values, rec.run_flags(), worst, row.get("name") or ""))
    return out


def varying_fields(runs: list[GroupedRun]) -> list[str]:
    """Config fields (besides seed, name, device, data root and defense names) that differ between runs."""
    keys: list[str] = []
    for r in runs:
        keys += [k for k in r.config if k not in keys]
    out = []
    for k in keys:
        if k in IGNORED_FIELDS:
            continue
        vals = {json.dumps(r.config.get(k), sort_keys=True, default=str) for r in runs}
        if len(vals) > 1:
            out.append(k)
    return out


def group_runs(runs: list[GroupedRun], fields: list[str] | None = None) -> list[Group]:
    """Runs that differ only in their seed form one group; groups are ordered by dataset, defense, params."""
    fields = varying_fields(runs) if fields is None else fields
    groups: dict[str, Group] = {}
    for r in runs:
        params = {k: r.config.get(k) for k in fields}
        key = json.dumps([r.dataset, r.model, r.cut, r.defense, params], sort_keys=True, default=str)
        g = groups.get(key)
        if g is None:
            g = groups[key] = Group(r.dataset, r.model, r.cut, r.defense, params)
        g.runs.append(r)

    def sortable(v: Any):
        # numbers in numeric order (lambda 1, 4, 16, not 1, 16, 4), before anything else
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return (0, float(v), "")
        return (1, 0.0, json.dumps(v, sort_keys=True, default=str))

    def order(g: Group):
        return (g.dataset, g.defense, [(k, sortable(g.params[k])) for k in sorted(g.params)])

    return sorted(groups.values(), key=order)


def attack_names(runs: list[GroupedRun]) -> list[str]:
    names: list[str] = []
    for r in runs:
        names += [a for a in r.record.attacks if a not in names]
    return names


def primary_attack(runs: list[GroupedRun], requested: str | None = None) -> str | None:
    """The privacy axis: ``worst`` (the worst case over the attack suite; the default) or a named attack."""
    names = attack_names(runs)
    if requested in (None, "worst") and any(r.values.get("worst.mse") is not None for r in runs):
        return "worst"
    if requested:
        if requested not in names:
            raise ValueError(f"attack '{requested}' is not in these results; recorded: {', '.join(names) or '(none)'}")
        return requested
    return "inverse_network" if "inverse_network" in names else (names[0] if names else None)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated when both coordinates are to be maximised (attack MSE, accuracy):
    a point is dominated if another is at least as good in both and better in one. Sorted by the first
    coordinate."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))

