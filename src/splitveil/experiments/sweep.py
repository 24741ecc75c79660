"""Sweeps: one base config and a grid or list of overrides; every point is a normal run (its own folder and
results-store row, via ``run_experiment``). Finished points are skipped on a re-run, interrupted ones resume
from their checkpoints, so a sweep killed at any moment continues with nothing lost and nothing run twice.

Backends: ``local`` (N worker processes on this machine, spawn start method; a worker that dies is replaced
and its point resumed once; every run uses its own fixed torch thread count, config ``threads``) and ``ray`` (an existing cluster by address, or a local one started for
the sweep; every run is one Ray task with its CPU/GPU request). See docs/sweeps.md for the file format.
"""
from __future__ import annotations

import copy
import fcntl
import itertools
import json
import os
import socket
import sys
import time
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, TextIO

from ..params import ConfigError
from . import ray_security
from .config import (RunConfig, absolute_root, apply_override, config_from_dict, read_yaml_mapping,
                     root_relative_to)
from .store import ResultsStore, RunBusyError, lock_path, run_lock

SWEEP_KEYS = ("name", "description", "base", "config", "set", "points", "grid", "out", "resources")
BACKENDS = ("local", "ray")


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
            if st == "finished" and not (self.out / p.run_id / "metrics.json").exists():
                st = "pending"
            out[p.run_id] = st
        return out


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


def _short(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "+".join(_short(x) for x in v)
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_short(x)}" for k, x in v.items()) + "}"
    return str(v)


def _check_overrides(obj: Any, where: str) -> dict[str, Any]:
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a mapping of dotted fields to values, e.g. {{defense.sigma: 0.1}}")
    return {str(k): v for k, v in obj.items()}


def _apply(tree: dict, overrides: dict[str, Any], where: str) -> None:
    for k, v in overrides.items():
        try:
            apply_override(tree, f"{k}={json.dumps(v)}")
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None


def expand(tree: dict) -> list[dict[str, Any]]:
    """The override sets of a sweep: every ``points`` entry crossed with every ``grid`` combination."""
    points = tree.get("points")
    if points is None:
        points = [{}]
    if not isinstance(points, list) or not points:
        raise ConfigError("points: expected a non-empty list of override mappings")
    points = [_check_overrides(p, f"points[{i}]") for i, p in enumerate(points)]
    grid = _check_overrides(tree.get("grid"), "grid")
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise ConfigError(f"grid.{k}: expected a non-empty list of values")
    keys = list(grid)
    combos = [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]
    return [{**p, **c} for p in points for c in combos]


def sweep_from_dict(tree: dict, source: Path | None = None, overrides: Iterable[str] = (),
                    out: str | Path | None = None) -> Sweep:
    """Build a sweep from its parsed file; ``overrides`` (``FIELD=VALUE``) apply to every point, last."""
    unknown = sorted(set(tree) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"unknown sweep field '{unknown[0]}'; valid fields: {', '.join(SWEEP_KEYS)}")
    base: dict = {}
    if tree.get("base"):
        base_path = Path(tree["base"])
        if not base_path.is_absolute() and source is not None:
            base_path = source.parent / base_path
        base = root_relative_to(read_yaml_mapping(base_path, "base: config file"), base_path.parent)
    if tree.get("config"):
        if not isinstance(tree["config"], dict):
            raise ConfigError("config: expected an inline run config (a mapping)")
        base = _merge(base, tree["config"])
    if not base and not tree.get("base"):
        raise ConfigError("a sweep needs `base: <run config file>` or an inline `config:`")
    name = str(tree.get("name") or (source.stem if source else "sweep"))
    fixed = _check_overrides(tree.get("set"), "set")
    res = {"cpus": 1, "gpus": 0, **_check_overrides(tree.get("resources"), "resources")}
    if set(res) - {"cpus", "gpus"}:
        raise ConfigError(f"resources: unknown field(s) {sorted(set(res) - {'cpus', 'gpus'})}; valid: cpus, gpus")
    points: list[SweepPoint] = []
    seen: dict[str, int] = {}
    for i, ov in enumerate(expand(tree)):
        t = copy.deepcopy(base)
        _apply(t, fixed, "set")
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
    out_dir = Path(out) if out else Path(tree.get("out") or Path("runs") / name)
    return Sweep(name, points, out_dir, res, str(tree.get("description") or ""), source)


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


# -- one point, in a worker process (local pool or Ray task) --------------------------------------------

def execute_point(config: dict, out: str, force: bool = False, threads: int | None = None) -> dict[str, Any]:
    """Run one sweep point unless it is finished already or another process holds its lock.

    Returns ``{"run_id", "status", "seconds", "error", "resumed"}``; never raises for a failing run (the
    failure is recorded in the store by ``run_experiment`` and reported here)."""
    import torch

    from .run import run_experiment

    if threads:
        torch.set_num_threads(max(1, int(threads)))
    cfg = config_from_dict(config)
    out_p = Path(out)
    run_id = cfg.run_id()
    res: dict[str, Any] = {"run_id": run_id, "status": "", "seconds": 0.0, "error": None, "resumed": False,
                           "pid": os.getpid(), "host": socket.gethostname()}
    if _STOPPED:  # a local worker that saw Ctrl-C runs none of the calls still queued to it
        res.update(status="interrupted", error="sweep interrupted")
        return res
    try:
        with run_lock(out_p, run_id):
            row = ResultsStore(out_p / "results.sqlite").get(run_id)
            if row and row["status"] == "finished" and (out_p / run_id / "metrics.json").exists() and not force:
                res["status"] = "skipped"
                return res
            # interrupted (or left 'running' by a killed process): continue from its checkpoints; failed or new: fresh
            resume = bool(row) and row["status"] in ("interrupted", "running") and not force
            t = time.perf_counter()
            try:
                run_experiment(cfg, out_p, resume=resume, force=force)
                res["status"] = "finished"
            except KeyboardInterrupt:
                res.update(status="interrupted", error="KeyboardInterrupt")
                _stop()
            except Exception as e:  # recorded as failed in the store by run_experiment
                res.update(status="failed", error=f"{type(e).__name__}: {e}")
            res["seconds"] = time.perf_counter() - t
            res["resumed"] = resume
            return res
    except RunBusyError:
        res.update(status="busy", error="running in another process")
        return res


def claimed_pids(out: Path, run_ids: Iterable[str]) -> dict[str, tuple[int, str, float]]:
    """Run id -> (pid, host, start time) of points whose lock file names a worker that is running them."""
    claims = {}
    for rid in run_ids:
        try:
            text = lock_path(out, rid).read_text().split()
        except OSError:
            continue
        if len(text) == 3:
            claims[rid] = (int(text[0]), text[1], float(text[2]))
    return claims


def _lock_is_free(out: Path, run_id: str) -> bool:
    lp = lock_path(out, run_id)
    if not lp.exists():
        return True
    fd = os.open(lp, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _mark_lost(out: Path, run_ids: Iterable[str], reason: str) -> None:
    """A point whose worker died stays 'running' in the store: mark it interrupted (it resumes on re-run)."""
    store = ResultsStore(out / "results.sqlite")
    for rid in run_ids:
        row = store.get(rid)
        if row and row["status"] == "running" and _lock_is_free(out, rid):
            store.set_status(rid, "interrupted", reason)
            try:
                os.truncate(lock_path(out, rid), 0)
            except OSError:
                pass


# -- live progress -------------------------------------------------------------------------------------

def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class SweepProgress:
    """One live status line (done / running / failed / remaining, elapsed, ETA) plus a line per finished
    point. On a terminal the status line is redrawn in place; otherwise it is printed when it changes."""

    def __init__(self, name: str, total: int, already: int, stream: TextIO | None = None, enabled: bool = True):
        self.name, self.total, self.already = name, total, already
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.time()
        self.done_now = 0
        self.failed = 0
        self.running = 0
        self._last = ""

    def line(self) -> str:
        done = self.already + self.done_now
        remaining = max(0, self.total - done - self.failed - self.running)
        elapsed = time.time() - self.t0
        finished_now = self.done_now + self.failed
        if finished_now:
            eta = _hms((remaining + self.running) * elapsed / finished_now)
        else:
            eta = "--:--"
        return (f"[{self.name}] done {done}/{self.total}  running {self.running}  failed {self.failed}  "
                f"remaining {remaining}  elapsed {_hms(elapsed)}  ETA {eta}")

    def update(self, running: int | None = None, force: bool = False) -> None:
        if running is not None:
            self.running = running
        if not self.enabled:
            return
        text = self.line()
        if self.tty:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()
        elif force or text.split("elapsed")[0] != self._last.split("elapsed")[0]:
            self.stream.write(text + "\n")
            self.stream.flush()
        self._last = text

    def event(self, text: str) -> None:
        if not self.enabled:
            return
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.update(force=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# -- backends ------------------------------------------------------------------------------------------

def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


_WORKER_INDEX = None
_LOCAL_WORKER = False   # set in local pool workers
_STOPPED = False        # a local worker interrupted once (Ctrl-C) stops taking work


def _stop() -> None:
    global _STOPPED
    if _LOCAL_WORKER:
        _STOPPED = True


class _Tracker:
    """Collects point results and drives the progress display for either backend."""

    def __init__(self, sweep: Sweep, todo: list[SweepPoint], skipped: list[str], progress: SweepProgress):
        self.sweep, self.todo, self.progress = sweep, todo, progress
        self.by_id = {p.run_id: p for p in todo}
        self.skipped = list(skipped)
        self.pending = set(self.by_id)
        self.ran: list[str] = []
        self.finished: list[str] = []
        self.failed: dict[str, str] = {}
        self.lost: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        self.worker_deaths = 0
        self.epochs_seen: dict[str, str] = {}

    def running(self) -> int:
        claims = claimed_pids(self.sweep.out, self.pending)
        return sum(1 for c in claims.values() if c[2] >= self.progress.t0 - 1)

    def epoch_progress(self) -> None:
        """One line per running point when its training finishes an epoch (read from its run.log), so a
        long point is not silent for minutes."""
        claims = claimed_pids(self.sweep.out, self.pending)
        for rid in claims:
            try:
                with open(self.sweep.out / rid / "run.log", "rb") as fh:
                    fh.seek(0, os.SEEK_END)
                    fh.seek(max(0, fh.tell() - 8192))
                    tail = fh.read().decode(errors="replace")
            except OSError:
                continue
            epochs = [ln for ln in tail.splitlines() if " splitveil.train INFO epoch " in ln]
            if not epochs:
                continue
            k = epochs[-1].split(" splitveil.train INFO epoch ", 1)[1].split(":", 1)[0]
            if self.epochs_seen.get(rid) != k:
                self.epochs_seen[rid] = k
                cfg = self.by_id[rid].config if rid in self.by_id else None
                total = f"/{cfg.train.epochs}" if cfg else ""
                label = self.by_id[rid].label if rid in self.by_id else rid
                self.progress.event(f"  epoch {k}{total}  {label}")

    def record(self, res: dict[str, Any]) -> None:
        rid = res["run_id"]
        self.pending.discard(rid)
        self.progress.running = self.running()
        st = res["status"]
        label = self.by_id[rid].label if rid in self.by_id else rid
        if st == "skipped":
            self.skipped.append(rid)
            self.progress.already += 1
            return
        if st == "busy":
            self.lost[rid] = res["error"]
            self.progress.event(f"  busy     {label}: {res['error']}")
            return
        self.ran.append(rid)
        self.seconds[rid] = res["seconds"]
        if st == "finished":
            self.finished.append(rid)
            self.progress.done_now += 1
            self.progress.event(f"  finished {label}  ({res['seconds']:.1f} s{', resumed' if res['resumed'] else ''})  {rid}")
        elif st == "failed":
            self.failed[rid] = res["error"]
            self.progress.failed += 1
            self.progress.event(f"  FAILED   {label}: {res['error']}")
        else:
            self.lost[rid] = res["error"] or st
            self.progress.event(f"  {st}  {label}")

    def lose_pending(self, reason: str) -> None:
        _mark_lost(self.sweep.out, self.pending, reason)
        for rid in sorted(self.pending):
            self.lost[rid] = reason
        self.pending.clear()


def _interrupt_handler(signum, frame):  # SIGTERM behaves like Ctrl-C: the run is marked interrupted
    raise KeyboardInterrupt


def _worker_main(index: int, tasks, results, out: str, force: bool, threads: int, gpus: int) -> None:
    """A local sweep worker: runs the points sent on ``tasks`` one at a time, reports each on ``results``."""
    global _WORKER_INDEX, _LOCAL_WORKER
    signal.signal(signal.SIGTERM, _interrupt_handler)
    _LOCAL_WORKER, _WORKER_INDEX = True, index
    if gpus > 1 and "CUDA_VISIBLE_DEVICES" not in os.environ:  # spread workers over the GPUs
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index % gpus)
    try:
        import torch

        torch.set_num_threads(threads)
        while not _STOPPED:
            item = tasks.get()
            if item is None:
                break
            results.put(("done", index, execute_point(item, out, force)))
    except KeyboardInterrupt:
        pass


class _LocalPool:
    """Worker processes fed one point at a time, so the parent always knows which point each one runs: a
    worker that dies (killed, out of memory) is replaced, and its point resumed once by another."""

    def __init__(self, n: int, out: str, force: bool, threads: int, gpus: int):
        import multiprocessing as mp

        self.ctx = mp.get_context("spawn")
        self.results = self.ctx.Queue()
        self.args = (out, force, threads, gpus)
        self.workers: dict[int, dict[str, Any]] = {}
        self.spawned = 0
        for _ in range(n):
            self.spawn()

    def spawn(self) -> None:
        i = self.spawned
        self.spawned += 1
        q = self.ctx.Queue()
        p = self.ctx.Process(target=_worker_main, args=(i, q, self.results, *self.args), daemon=True)
        p.start()
        self.workers[i] = {"proc": p, "tasks": q, "rid": None}

    def idle(self) -> list[int]:
        return [i for i, w in self.workers.items() if w["rid"] is None and w["proc"].is_alive()]

    def send(self, i: int, rid: str, config: dict) -> None:
        self.workers[i]["rid"] = rid
        self.workers[i]["tasks"].put(config)

    def dead(self) -> list[tuple[int, str | None, int | None]]:
        """Workers that died since the last call: (index, the point it ran, exit code); they are removed."""
        gone = []
        for i, w in list(self.workers.items()):
            if not w["proc"].is_alive():
                gone.append((i, w["rid"], w["proc"].exitcode))
                del self.workers[i]
        return gone

    def interrupt(self) -> None:
        for w in self.workers.values():
            if w["proc"].is_alive():
                try:
                    os.kill(w["proc"].pid, signal.SIGINT)
                except OSError:
                    pass

    def close(self, timeout: float = 30.0) -> None:
        for w in self.workers.values():
            if w["proc"].is_alive():
                try:
                    w["tasks"].put(None)
                except (OSError, ValueError):
                    pass
        deadline = time.time() + timeout
        for w in self.workers.values():
            w["proc"].join(max(0.0, deadline - time.time()))
            if w["proc"].is_alive():
                w["proc"].terminate()
                w["proc"].join(5)


MAX_POINT_RETRIES = 1   # a point whose worker died is resumed this many times in the same sweep


def _run_local(sweep: Sweep, tracker: _Tracker, workers: int, force: bool) -> int:
    import queue as queue_mod
    from collections import deque

    import torch

    threads = max(1, available_cores() // workers)   # threads of the worker itself; each run sets its own
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    configs = {p.run_id: p.config.to_dict() for p in tracker.todo}
    todo = deque(p.run_id for p in tracker.todo)
    retries: dict[str, int] = {}
    pool = _LocalPool(workers, str(sweep.out), force, threads, gpus)

    def drain(timeout: float) -> None:
        try:
            kind, i, res = pool.results.get(timeout=timeout)
        except queue_mod.Empty:
            return
        if i in pool.workers:
            pool.workers[i]["rid"] = None
        tracker.record(res)
        while True:   # anything else already waiting
            try:
                kind, i, res = pool.results.get_nowait()
            except queue_mod.Empty:
                return
            if i in pool.workers:
                pool.workers[i]["rid"] = None
            tracker.record(res)

    try:
        while todo or any(w["rid"] for w in pool.workers.values()):
            for i in pool.idle():
                if not todo:
                    break
                rid = todo.popleft()
                pool.send(i, rid, configs[rid])
            drain(1.0)
            for i, rid, code in pool.dead():
                drain(0.2)   # a result it sent just before dying
                tracker.worker_deaths += 1
                if rid is not None and rid in tracker.pending:
                    reason = f"a worker process died (exit code {code}: killed or out of memory)"
                    _mark_lost(sweep.out, [rid], reason)
                    retries[rid] = retries.get(rid, 0) + 1
                    if retries[rid] <= MAX_POINT_RETRIES:
                        todo.appendleft(rid)
                        tracker.progress.event(f"  {reason}; replaced, resuming {tracker.by_id[rid].label}")
                    else:
                        tracker.pending.discard(rid)
                        tracker.lost[rid] = reason + "; twice, given up (re-run the sweep to resume it)"
                        tracker.progress.event(f"  LOST     {tracker.by_id[rid].label}: {tracker.lost[rid]}")
                if todo and len(pool.workers) < workers:
                    pool.spawn()
            tracker.epoch_progress()
            tracker.progress.update(running=tracker.running())
    except KeyboardInterrupt:
        # Ctrl-C or SIGTERM to the parent alone: interrupt the running points (they are marked interrupted
        # and resume on the next sweep) and start none of the queued ones
        tracker.progress.event("  interrupting: the running points stop at once and resume on the next sweep")
        pool.interrupt()
        try:
            end = time.time() + 30
            while any(w["rid"] for w in pool.workers.values()) and time.time() < end:
                drain(0.5)
                for i, rid, code in pool.dead():
                    pass
        except KeyboardInterrupt:
            pass
        pool.close(timeout=5)
        tracker.lose_pending("sweep interrupted")
        raise
    pool.close()
    return workers


RAY_MIN_VERSION = (2, 59)


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def _run_ray(sweep: Sweep, tracker: _Tracker, force: bool, address: str | None, num_cpus: int | None,
             num_gpus: int | None, cpus_per_run: float, gpus_per_run: float) -> int:
    try:
        import ray
    except ImportError:
        raise ConfigError("the ray backend needs Ray: pip install 'splitveil[ray]'") from None
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address:
            ray.init(address=address, **kwargs)
        else:
            # a local cluster runs arbitrary code for whoever can reach it, and Ray listens on all interfaces
            # whatever address it is given: require its token authentication (splitveil.experiments.ray_security)
            if _version_tuple(ray.__version__) < RAY_MIN_VERSION:
                raise ConfigError(f"the ray backend needs Ray >= {'.'.join(map(str, RAY_MIN_VERSION))} (token "
                                  f"authentication by default); found {ray.__version__}: pip install -U 'ray>=2.59'")
            ray_security.check_auth_not_disabled()
            ray.init(num_cpus=num_cpus or available_cores(), num_gpus=num_gpus, **kwargs)
            try:
                ray_security.check_started_cluster()
            except ConfigError:
                ray.shutdown()
                raise
        started = True
    try:
        cluster = ray.cluster_resources()
        slots = max(1, int(cluster.get("CPU", 1) // max(cpus_per_run, 1e-9)))
        if gpus_per_run:
            slots = min(slots, max(1, int(cluster.get("GPU", 0) // gpus_per_run)))
        task = ray.remote(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0)(execute_point)
        threads = max(1, int(cpus_per_run))
        refs = {task.remote(p.config.to_dict(), str(sweep.out.resolve()), force, threads): p.run_id
                for p in tracker.todo}
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
                for ref in done:
                    try:
                        tracker.record(ray.get(ref))
                    except Exception as e:  # the task's worker died (killed, out of memory, node lost)
                        rid = refs[ref]
                        reason = f"Ray task lost: {type(e).__name__}"
                        tracker.pending.discard(rid)
                        _mark_lost(sweep.out, [rid], reason)
                        tracker.lost[rid] = reason
                        tracker.progress.event(f"  LOST     {tracker.by_id[rid].label}: {reason}; re-run the sweep to resume")
                tracker.epoch_progress()
                tracker.progress.update(running=tracker.running())
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref, force=True)
            tracker.lose_pending("sweep interrupted")
            raise
        return slots
    finally:
        if started:
            ray.shutdown()


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
    tracker = _Tracker(sweep, todo, skipped, prog)
    t0 = time.time()
    prog.update(running=0, force=True)
    slots = 1
    try:
        if todo:
            if backend == "local":
                slots = max(1, min(workers or 1, len(todo)))
                slots = _run_local(sweep, tracker, slots, force)
            else:
                slots = _run_ray(sweep, tracker, force, address, num_cpus, num_gpus,
                                 float(cpus_per_run if cpus_per_run is not None else sweep.resources["cpus"]),
                                 float(gpus_per_run if gpus_per_run is not None else sweep.resources["gpus"]))
    finally:
        prog.update(running=0, force=True)
        prog.close()
    return SweepResult(sweep.name, len(sweep.points), tracker.skipped, tracker.ran, tracker.finished,
                       tracker.failed, tracker.lost, tracker.seconds, time.time() - t0, slots, tracker.worker_deaths)


def check_points(sweep: Sweep) -> dict[str, str]:
    """Run id -> problem of every point whose data root or ``model.cut`` is bad (what would only fail once
    running, leaving a 'failed' row); checked once per distinct data/model setting."""
    from dataclasses import asdict

    from .run import preflight

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


__all__ = ["Sweep", "SweepPoint", "SweepProgress", "SweepResult", "describe", "execute_point", "expand",
           "load_sweep", "run_sweep", "sweep_from_dict"]
