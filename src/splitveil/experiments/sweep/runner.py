"""Running a sweep: every point that has not finished, on a backend, with live progress; and the checks and
the status table of a sweep."""
from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from dataclasses import dataclass
from typing import TextIO

from ...params import ConfigError
from ..store import ResultsStore
from .backends import BACKENDS
from .progress import SweepProgress, Tracker
from .spec import Sweep


@dataclass
class SweepResult:
    """What one ``run_sweep`` call did. ``ran``: run ids executed now; ``skipped``: already finished before."""
    name: str
    total: int
    skipped: list[str]
    ran: list[str]
    finished: list[str]
    failed: dict[str, str]
    lost: dict[str, str]                  # not finished: worker died, busy elsewhere, interrupted, never started
    run_seconds: dict[str, float]
    wall_s: float
    slots: int                            # parallel slots (workers, or concurrent Ray tasks)
    worker_deaths: int = 0                # local workers that died (each replaced, its point resumed once)

    @property
    def complete(self) -> bool:
        return len(self.skipped) + len(self.finished) == self.total

    @property
    def efficiency(self) -> float | None:
        """Sum of the runs' own wall times / (sweep wall time x parallel slots)."""
        if not self.run_seconds or self.wall_s <= 0:
            return None
        return sum(self.run_seconds.values()) / (self.wall_s * self.slots)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def stop_on_signals():
    """While inside, SIGTERM and SIGHUP stop the sweep as Ctrl-C does (running points marked interrupted, the
    workers gone within seconds); the previous handlers are restored after. Main thread only (elsewhere a no-op)."""
    saved = {}
    if threading.current_thread() is threading.main_thread():
        for name in ("SIGTERM", "SIGHUP"):
            sig = getattr(signal, name, None)
            if sig is not None:
                saved[sig] = signal.signal(sig, _raise_interrupt)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def run_sweep(sweep: Sweep, backend: str = "local", workers: int | None = None, force: bool = False,
              progress: bool = True, stream: TextIO | None = None, address: str | None = None,
              num_cpus: int | None = None, num_gpus: int | None = None, cpus_per_run: float | None = None,
              gpus_per_run: float | None = None) -> SweepResult:
    """Run every point of ``sweep`` that has not finished; returns what was done (see ``SweepResult``)."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend: '{backend}' is not one of {', '.join(BACKENDS)}")
    bad = check_points(sweep)
    if bad:
        p = next(p for p in sweep.points if p.run_id in bad)
        raise ConfigError(f"point {p.index} ({p.label}): {bad[p.run_id]}"
                          + (f" (and {len(bad) - 1} more point(s))" if len(bad) > 1 else ""))
    sweep.out.mkdir(parents=True, exist_ok=True)
    ResultsStore(sweep.out / "results.sqlite")  # create the store (WAL) before workers race to
    status = sweep.status()
    skipped = [p.run_id for p in sweep.points if status[p.run_id] == "finished" and not force]
    todo = [p for p in sweep.points if p.run_id not in skipped]
    prog = SweepProgress(sweep.name, len(sweep.points), len(skipped), stream, progress)
    tracker = Tracker(sweep, todo, skipped, prog)
    t0 = time.time()
    prog.update(running=0, force=True)
    slots = 1
    try:
        with stop_on_signals():
            slots = _run_backend(sweep, tracker, todo, backend, workers, force, address, num_cpus, num_gpus,
                                 cpus_per_run, gpus_per_run)
    finally:
        prog.update(running=0, force=True)
        prog.close()
    return SweepResult(sweep.name, len(sweep.points), tracker.skipped, tracker.ran, tracker.finished,
                       tracker.failed, tracker.lost, tracker.seconds, time.time() - t0, slots, tracker.worker_deaths)


def _run_backend(sweep, tracker, todo, backend, workers, force, address, num_cpus, num_gpus, cpus_per_run,
                 gpus_per_run) -> int:
    """Run ``todo`` on the backend; returns the number of parallel slots."""
    if not todo:
        return 1
    if backend == "local":
        from .backends.local import _run_local

        return _run_local(sweep, tracker, max(1, min(workers or 1, len(todo))), force)
    from .backends.ray import _run_ray

    return _run_ray(sweep, tracker, force, address, num_cpus, num_gpus,
                    float(cpus_per_run if cpus_per_run is not None else sweep.resources["cpus"]),
                    float(gpus_per_run if gpus_per_run is not None else sweep.resources["gpus"]))


def check_points(sweep: Sweep) -> dict[str, str]:
    """Run id -> problem of every point whose data root or ``model.cut`` is bad (what would only fail once
    running, leaving a 'failed' row); checked once per distinct data/model setting."""
    from dataclasses import asdict

    from ..run import preflight

    seen: dict[str, str | None] = {}
    bad = {}
    for p in sweep.points:
        key = json.dumps([asdict(p.config.data), asdict(p.config.model)], sort_keys=True, default=str)
        if key not in seen:
            try:
                preflight(p.config)
                seen[key] = None
            except ConfigError as e:
                seen[key] = str(e)
        if seen[key]:
            bad[p.run_id] = seen[key]
    return bad


def describe(sweep: Sweep, status: dict[str, str] | None = None) -> str:
    """A markdown table of the points of a sweep with their current status."""
    status = status or sweep.status()
    bad = check_points(sweep)
    status = {rid: (f"invalid: {bad[rid]}" if rid in bad else st) for rid, st in status.items()}
    lines = [f"sweep {sweep.name}: {len(sweep.points)} points -> {sweep.out}", "",
             "| # | overrides | status | run id |", "|---|---|---|---|"]
    for p in sweep.points:
        lines.append(f"| {p.index} | {p.label} | {status.get(p.run_id, '')} | {p.run_id} |")
    return "\n".join(lines)
