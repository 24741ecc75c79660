"""The local backend: N worker processes on this machine (spawn start method), fed one point at a time; a
worker that dies is replaced and its point resumed once; every run uses its own fixed torch thread count
(config ``threads``)."""
from __future__ import annotations

import os
import signal
import time
from typing import Any

from .. import point
from ..locks import mark_lost
from ..progress import Tracker
from ..spec import Sweep

_WORKER_INDEX = None


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def _interrupt_handler(signum, frame):  # SIGTERM behaves like Ctrl-C: the run is marked interrupted
    raise KeyboardInterrupt


def _worker_main(index: int, tasks, results, out: str, force: bool, threads: int, gpus: int) -> None:
    """A local sweep worker: runs the points sent on ``tasks`` one at a time, reports each on ``results``."""
    global _WORKER_INDEX
    signal.signal(signal.SIGTERM, _interrupt_handler)
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
            results.put(("done", index, point.execute_point(item, out, force)))
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


def _run_local(sweep: Sweep, tracker: Tracker, workers: int, force: bool) -> int:
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
