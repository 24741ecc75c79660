"""Sweep point locks: which worker runs which point, and marking the points of dead workers interrupted.

A run's lock file (``experiments.store.run_lock``) holds "pid host start-time" while a process runs it; an
flock on it tells whether that process is still alive."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Iterable

from ..store import ResultsStore, lock_path


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


def mark_lost(out: Path, run_ids: Iterable[str], reason: str) -> None:
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
