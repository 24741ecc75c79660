"""What a sweep shows while it runs: one live status line and a line per finished point (``SweepProgress``),
fed by the ``Tracker`` that collects the points' results for either backend."""
from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

from .locks import mark_lost, claimed_pids
from .spec import Sweep, SweepPoint


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


class Tracker:
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
        mark_lost(self.sweep.out, self.pending, reason)
        for rid in sorted(self.pending):
            self.lost[rid] = reason
        self.pending.clear()


_Tracker = Tracker   # the older private name
