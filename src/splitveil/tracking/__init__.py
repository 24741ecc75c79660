"""Experiment tracking: a small callback protocol that a run (or an audit) reports to, and its back-ends.

A config enables it with ``tracking:``, one entry per back-end::

    tracking: {tensorboard: runs/tb}                       # log directory (one sub-folder per run id)
    tracking: {mlflow: file:./mlruns}                       # tracking URI (a local store, or a server)
    tracking: {mlflow: {uri: http://host:5000, experiment: cifar}}

The back-ends import their library only when enabled (``pip install 'splitveil[tensorboard]'`` /
``'splitveil[mlflow]'``); without ``tracking:`` nothing is imported and nothing is logged. Tracking never
changes a result: the run id ignores it. A back-end from the user's code registers a :class:`Tracker` class with
``@TRACKERS.register("name")``.

The calls a tracker receives, in order: ``run_start(run_id, config)``, ``epoch(epoch, metrics)`` after every
training epoch, ``attack(name, result)`` after every attack, ``run_end(record)`` with the final record (the
metrics.json dict), then ``close(status)`` (``finished``, ``failed`` or ``interrupted``)."""
from __future__ import annotations

from typing import Any, Mapping

from ..params import ConfigError, coerce
from ..registry import Registry

TRACKERS: Registry[type["Tracker"]] = Registry("tracker")


class Tracker:
    """A tracking back-end; every call has a no-op default. ``Params``: its dataclass of options; a plain
    string in the config sets the first field (the location)."""
    name: str = ""
    Params: type = object

    def __init__(self, params: Any):
        self.params = params

    def run_start(self, run_id: str, config: Mapping[str, Any]) -> None:
        pass

    def epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        pass

    def attack(self, name: str, result: Mapping[str, Any]) -> None:
        pass

    def run_end(self, record: Mapping[str, Any]) -> None:
        pass

    def close(self, status: str = "finished") -> None:
        pass


class Trackers(Tracker):
    """Several trackers as one (the run calls this); an empty one does nothing."""

    def __init__(self, trackers: list[Tracker] | None = None):
        super().__init__(None)
        self.trackers = list(trackers or [])
        self._epochs: set[int] = set()

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def run_start(self, run_id, config) -> None:
        for t in self.trackers:
            t.run_start(run_id, config)

    def epoch(self, epoch, metrics) -> None:
        self._epochs.add(int(epoch))
        for t in self.trackers:
            t.epoch(epoch, metrics)

    def history(self, history: list[Mapping[str, Any]]) -> None:
        """The epochs of ``history`` not reported yet (those trained before a resume)."""
        for h in history:
            e = int(h.get("epoch", 0))
            if e not in self._epochs:
                self.epoch(e, {k: v for k, v in h.items() if k != "epoch"})

    def attack(self, name, result) -> None:
        for t in self.trackers:
            t.attack(name, result)

    def run_end(self, record) -> None:
        for t in self.trackers:
            t.run_end(record)

    def close(self, status: str = "finished") -> None:
        for t in self.trackers:
            t.close(status)


def _params(cls: type[Tracker], value: Any, field: str) -> Any:
    import dataclasses

    if isinstance(value, str):
        first = dataclasses.fields(cls.Params)[0].name
        value = {first: value}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{field}: expected a location string or a mapping of options, got {value!r}")
    return coerce(cls.Params, dict(value), field)


def validate_tracking(spec: Any) -> dict[str, Any]:
    """``tracking:`` as written (``{backend: location or options}``), checked: every back-end registered, its
    options valid. The libraries are not imported here."""
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"tracking: expected a mapping such as {{tensorboard: runs/tb}}, got {spec!r}")
    for name, value in spec.items():
        if name not in TRACKERS:
            raise ConfigError(f"tracking.{name}: {TRACKERS.unknown(name)}")
        _params(TRACKERS.get(name), value, f"tracking.{name}")
    return dict(spec)


def build_trackers(spec: Mapping[str, Any] | None) -> Trackers:
    """The trackers ``spec`` enables (each imports its library now: a missing one is a ConfigError naming the
    extra to install)."""
    out = []
    for name, value in (spec or {}).items():
        cls = TRACKERS.get(name)
        out.append(cls(_params(cls, value, f"tracking.{name}")))
    return Trackers(out)


def flat_scalars(d: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a nested mapping as ``{"a/b": value}`` (booleans and non-numbers left out)."""
    import math

    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flat_scalars(v, f"{key}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[key] = float(v)
    return out


def summary_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The headline numbers of a run's record: accuracy, each attack's MSE / PSNR / SSIM, the mean-image baseline,
    the worst case and the edge cost."""
    out: dict[str, float] = {}
    if isinstance(record.get("accuracy"), (int, float)):
        out["accuracy"] = float(record["accuracy"])
    for name, a in (record.get("attacks") or {}).items():
        for m in ("mse", "psnr", "ssim"):
            if isinstance(a.get(m), (int, float)):
                out[f"attack/{name}/{m}"] = float(a[m])
    for name, b in (record.get("baseline") or {}).items():
        if isinstance(b.get("mse"), (int, float)):
            out[f"baseline/{name}/mse"] = float(b["mse"])
    out.update(flat_scalars({k: v for k, v in (record.get("cost") or {}).items()}, "cost/"))
    for m, w in (record.get("worst_case") or {}).items():
        if isinstance(w, Mapping) and isinstance(w.get("value"), (int, float)):
            out[f"worst_case/{m}"] = float(w["value"])
    return out


from . import mlflow_tracker, tensorboard  # noqa: E402,F401  (register the back-ends; their libraries load lazily)

__all__ = ["TRACKERS", "Tracker", "Trackers", "build_trackers", "flat_scalars", "summary_scalars", "validate_tracking"]
