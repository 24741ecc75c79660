"""One sweep point, run in a worker process (a local pool worker or a Ray task)."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from ..config import config_from_dict
from ...results.store import ResultsStore, RunBusyError, is_finished, run_lock

LOCAL_WORKER = False   # set in local pool workers
STOPPED = False        # a local worker interrupted once (Ctrl-C) stops taking work


def stop() -> None:
    global STOPPED
    if LOCAL_WORKER:
        STOPPED = True


BUSY_POLL_S = 0.5   # how often a point run elsewhere is checked while waiting for it (wait_busy)


def _wait_for_lock(out: Path, run_id: str) -> None:
    """Block until no process holds the point's run lock (the other sweep finished, stopped or died)."""
    from .locks import _lock_is_free

    while not _lock_is_free(out, run_id):
        if STOPPED:
            return
        time.sleep(BUSY_POLL_S)


def execute_point(config: dict, out: str, force: bool = False, threads: int | None = None,
                  wait_busy: bool = False) -> dict[str, Any]:
    """Run one sweep point unless it is finished already or another process holds its lock.

    ``wait_busy``: when another process (another sweep on the same ``--out``) holds the point, wait until it lets
    go, then skip the point if that process finished it, or continue it if not; without it the point is
    reported ``busy`` at once.

    Returns ``{"run_id", "status", "seconds", "error", "resumed"}``; never raises for a failing run (the
    failure is recorded in the store by ``run_experiment`` and reported here)."""
    import torch

    from ..run import run_experiment

    if threads:
        torch.set_num_threads(max(1, int(threads)))
    cfg = config_from_dict(config)
    out_p = Path(out)
    run_id = cfg.run_id()
    res: dict[str, Any] = {"run_id": run_id, "status": "", "seconds": 0.0, "error": None, "resumed": False,
                           "pid": os.getpid(), "host": socket.gethostname()}
    if STOPPED:  # a local worker that saw Ctrl-C runs none of the calls still queued to it
        res.update(status="interrupted", error="sweep interrupted")
        return res
    if wait_busy:
        _wait_for_lock(out_p, run_id)
    try:
        with run_lock(out_p, run_id):
            row = ResultsStore(out_p / "results.sqlite").get(run_id)
            if is_finished(row, out_p / run_id) and (not force or wait_busy):   # (finished by the other sweep)
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
                stop()
            except Exception as e:  # recorded as failed in the store by run_experiment
                res.update(status="failed", error=f"{type(e).__name__}: {e}")
            res["seconds"] = time.perf_counter() - t
            res["resumed"] = resume
            return res
    except RunBusyError:
        res.update(status="busy", error="running in another process")
        return res
