"""Wall time of a run, per stage and cumulative across resumes (``<run>/timings.json``).

An interrupted run that is resumed keeps the time its earlier sessions spent: every stage's seconds are the sum
over sessions, ``total_s`` is the whole wall time so far and ``sessions`` the number of starts. The file is
rewritten after each stage and when a stage is interrupted (Ctrl-C, SIGTERM, an error); only a process killed
outright (SIGKILL, power loss) loses the time since its last write."""
from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..utils import atomic_write_text

log = logging.getLogger("splitveil.run")
FILE = "timings.json"


class StageTimer:
    """Times the stages of one session of a run and adds the earlier sessions' times (``resume``)."""

    def __init__(self, run_dir: Path | None, resume: bool = False):
        self.path = Path(run_dir) / FILE if run_dir is not None else None
        self.prev: dict[str, float] = {}
        if resume and self.path is not None and self.path.exists():
            try:
                self.prev = {k: float(v) for k, v in json.loads(self.path.read_text()).items()}
            except (OSError, ValueError, TypeError, AttributeError) as e:
                log.warning("%s cannot be read (%s): the earlier sessions' time is not counted", self.path, e)
        self.now: dict[str, float] = {}
        self.t0 = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as stage ``name`` (``<name>_s``); the file is written when it ends, however it ends."""
        t = time.perf_counter()
        try:
            yield
        finally:
            key = f"{name}_s"
            self.now[key] = self.now.get(key, 0.0) + time.perf_counter() - t
            self.save()

    def add(self, name: str, seconds: float) -> None:
        """Seconds measured elsewhere (a part of a stage, e.g. ``train_steps``) recorded as ``<name>_s``."""
        key = f"{name}_s"
        self.now[key] = self.now.get(key, 0.0) + float(seconds)

    def totals(self) -> dict[str, float]:
        """Every stage's seconds over all sessions, ``total_s`` (wall time of all sessions), ``session_s`` (this
        one) and ``sessions``."""
        out = dict(self.prev)
        for k, v in self.now.items():
            out[k] = out.get(k, 0.0) + v
        session = time.perf_counter() - self.t0
        out["session_s"] = session
        out["total_s"] = self.prev.get("total_s", 0.0) + session
        out["sessions"] = self.prev.get("sessions", 0.0) + 1
        return out

    def save(self) -> None:
        if self.path is not None and self.path.parent.exists():
            atomic_write_text(self.path, json.dumps(self.totals(), indent=1))
