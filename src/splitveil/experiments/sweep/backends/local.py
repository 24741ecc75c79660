"""The local backend: N worker processes on this machine (spawn start method), fed one point at a time; a
worker that dies is replaced and its point resumed once; every run uses its own fixed torch thread count
(config ``threads``)."""
from __future__ import annotations

import os
import signal
import time
from typing import Any

from .. import point
from ....lifeline import run_child
from ..locks import mark_lost
from ..progress import Tracker
from ..spec import Sweep

_WORKER_INDEX = None


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))
_INTERRUPTED = False


def _interrupt_handler(signum, frame):
    """SIGTERM / SIGHUP behave like Ctrl-C (the run is marked interrupted), once: a second signal (the parent's
    death is signalled twice, see splitveil.lifeline) does not break the recording of the first."""
    global _INTERRUPTED
    if _INTERRUPTED:
        return
    _INTERRUPTED = True
    point.stop()
    raise KeyboardInterrupt


def _worker_main(index: int, tasks, results, out: str, force: bool, threads: int, gpus: int) -> None:
    """A local sweep worker: runs the points sent on ``tasks`` one at a time, reports each on ``results``. Started
    through ``splitveil.lifeline.run_child``: it stops within seconds when the sweep process dies."""
    global _WORKER_INDEX
    for sig in STOP_SIGNALS:
        signal.signal(sig, _interrupt_handler)
    point.LOCAL_WORKER, _WORKER_INDEX = True, index
    if gpus > 1 and "CUDA_VISIBLE_DEVICES" not in os.environ:  # spread workers over the GPUs
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index % gpus)
    try:
        import torch

        torch.set_num_threads(threads)
        while not point.STOPPED:
            item = tasks.get()
            if item is None:
                break
            results.put(("done", index, point.execute_point(item["config"], out, force, wait_busy=item["wait"])))
    except KeyboardInterrupt:
        pass
    if point.STOPPED:
        # interrupted (SIGTERM / SIGHUP / the parent's death): the point is recorded; hand the last result over
        # and leave at once, without the interpreter's teardown (seconds of CPU on a loaded machine)
        try:
            results.close()
            results.join_thread()
        except (OSError, ValueError, AssertionError):
            pass
        os._exit(0)


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
        p = self.ctx.Process(target=run_child, args=(os.getpid(), __name__, "_worker_main", (i, q, self.results, *self.args)),
                             daemon=True)
        p.start()
        self.workers[i] = {"proc": p, "tasks": q, "rid": None}

    def idle(self) -> list[int]:
        return [i for i, w in self.workers.items() if w["rid"] is None and w["proc"].is_alive()]

    def send(self, i: int, rid: str, config: dict, wait: bool = False) -> None:
        self.workers[i]["rid"] = rid
        self.workers[i]["tasks"].put({"config": config, "wait": wait})

    def dead(self) -> list[tuple[int, str | None, int | None]]:
        """Workers that died since the last call: (index, the point it ran, exit code); they are removed."""
        gone = []
        for i, w in list(self.workers.items()):
            if not w["proc"].is_alive():
                gone.append((i, w["rid"], w["proc"].exitcode))
                del self.workers[i]
        return gone

    def interrupt(self) -> None:
        """SIGTERM to every live worker (its handler interrupts the run, which is marked interrupted; SIGINT may
        be ignored in a sweep started in the background by a script)."""
        for w in self.workers.values():
            if w["proc"].is_alive():
                try:
                    os.kill(w["proc"].pid, signal.SIGTERM)
                except OSError:
                    pass

    def alive(self) -> bool:
        return any(w["proc"].is_alive() for w in self.workers.values())

    def kill(self) -> None:
        """SIGKILL the workers still alive (their points are marked interrupted by the caller)."""
        for w in self.workers.values():
            if w["proc"].is_alive():
                w["proc"].kill()
        for w in self.workers.values():
            w["proc"].join(5)

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
STOP_GRACE_S = 3.0      # after SIGTERM / SIGHUP / Ctrl-C: how long the workers get to record their points interrupted


def _run_local(sweep: Sweep, tracker: Tracker, workers: int, force: bool) -> int:
    import queue as queue_mod
    from collections import deque

    import torch

    threads = max(1, available_cores() // workers)   # threads of the worker itself; each run sets its own
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    configs = {p.run_id: p.config.to_dict() for p in tracker.todo}
    todo = deque(p.run_id for p in tracker.todo)
    retries: dict[str, int] = {}
    waiting: set[str] = set()    # points another process (another sweep on this --out) runs: waited for last
    pool = _LocalPool(workers, str(sweep.out), force, threads, gpus)

    def handle(i: int, res: dict) -> None:
        if i in pool.workers:
            pool.workers[i]["rid"] = None
        rid = res["run_id"]
        if res["status"] == "busy" and rid not in waiting:
            # run by another process: sent again, after every other point, to a worker that waits for it to be
            # let go and then skips it (finished there) or continues it (stopped there)
            waiting.add(rid)
            todo.append(rid)
            tracker.progress.event(f"  busy     {tracker.by_id[rid].label}: running in another process; waiting for it")
            return
        tracker.record(res)

    def drain(timeout: float) -> None:
        try:
            kind, i, res = pool.results.get(timeout=timeout)
        except queue_mod.Empty:
            return
        handle(i, res)
        while True:   # anything else already waiting
            try:
                kind, i, res = pool.results.get_nowait()
            except queue_mod.Empty:
                return
            handle(i, res)

    try:
        while todo or any(w["rid"] for w in pool.workers.values()):
            for i in pool.idle():
                if not todo:
                    break
                rid = todo.popleft()
                pool.send(i, rid, configs[rid], wait=rid in waiting)
            drain(1.0)
            for i, rid, code in pool.dead():
                drain(0.2)   # a result it sent just before dying
                tracker.worker_deaths += 1
                if rid is not None and rid in tracker.pending:
                    reason = f"a worker process died (exit code {code}: killed or out of memory)"
                    mark_lost(sweep.out, [rid], reason)
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
        # Ctrl-C, SIGTERM or SIGHUP to the parent: interrupt the running points (each worker records its point
        # interrupted; it resumes on the next sweep), start none of the queued ones, and be gone within seconds
        tracker.progress.event("  interrupting: the running points stop at once and resume on the next sweep")
        pool.interrupt()
        end = time.time() + STOP_GRACE_S
        while time.time() < end:
            try:
                drain(0.1)
                if not pool.alive():
                    drain(0.1)
                    break
            except KeyboardInterrupt:   # a second signal: stop waiting
                break
        pool.kill()
        tracker.lose_pending("sweep interrupted")   # what a killed worker left 'running' is marked interrupted
        raise
    pool.close()
    return workers
