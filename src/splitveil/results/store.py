"""The results store: one SQLite row per run (WAL mode, safe for concurrent writers), the per-run lock, and the
two decisions every reader shares: where a runs folder keeps its store (``results_paths``) and when a run
counts as finished (``is_finished``)."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..params import CorruptFileError

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id     TEXT PRIMARY KEY,
    status     TEXT NOT NULL,          -- running | finished | failed | interrupted
    name       TEXT, dataset TEXT, model TEXT, cut TEXT, defense TEXT, seed INTEGER,
    accuracy   REAL,
    metrics    TEXT,                   -- metrics.json of a finished run
    config     TEXT,                   -- the fully resolved config
    run_dir    TEXT,
    error      TEXT,
    started    REAL, updated REAL,
    owner      TEXT                    -- pid@host of the process running it (status updates must match)
);
"""
STATUSES = ("running", "finished", "failed", "interrupted")
DB_NAME = "results.sqlite"
METRICS_FILE = "metrics.json"


def results_paths(results: str | Path) -> tuple[Path, Path]:
    """(runs folder, store file) of ``results``: a runs folder (holding ``results.sqlite``) or the store file."""
    path = Path(results)
    if path.is_dir() or (not path.exists() and path.suffix.lower() not in (".sqlite", ".sqlite3", ".db")):
        return path, path / DB_NAME      # a runs folder, or one not made yet (`report runs/` before any run)
    return path.parent, path


def open_store(results: str | Path) -> ResultsStore:
    """The existing store of ``results`` (a runs folder or its ``results.sqlite``); FileNotFoundError naming the
    command that creates it when there is none."""
    folder, db = results_paths(results)
    if not db.exists():
        raise FileNotFoundError(f"no results store at {db}: nothing was recorded in {folder}/ yet (run `splitveil run "
                                f"CONFIG --out {folder}` or `splitveil sweep SWEEP.yaml --out {folder}` first)")
    return ResultsStore(db)


def is_finished(row: dict[str, Any] | None, run_dir: str | Path) -> bool:
    """A run is finished when its store row says so *and* its folder holds ``metrics.json`` (a row whose folder
    was deleted is run again)."""
    return bool(row) and row.get("status") == "finished" and (Path(run_dir) / METRICS_FILE).exists()


class ResultsStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._connect() as db:
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(SCHEMA)
                cols = {r[1] for r in db.execute("PRAGMA table_info(runs)")}
                if "owner" not in cols:   # a store written before status updates carried an owner
                    db.execute("ALTER TABLE runs ADD COLUMN owner TEXT")
        except sqlite3.DatabaseError as e:
            raise CorruptFileError(f"{self.path}: not a readable results store ({e}); rebuild it from its run "
                                   f"folders' metrics.json with `splitveil store rebuild {self.path.parent}`") from None

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA busy_timeout=60000")
            yield db
        finally:
            db.close()

    def start(self, run_id: str, config: dict[str, Any], run_dir: str | Path, defense: str,
              owner: str | None = None) -> None:
        now = time.time()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "INSERT INTO runs (run_id, status, name, dataset, model, cut, defense, seed, config, run_dir, started,"
                " updated, owner) VALUES (?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(run_id) DO UPDATE SET status='running', error=NULL, metrics=NULL, accuracy=NULL,"
                " config=excluded.config, run_dir=excluded.run_dir, updated=excluded.updated, owner=excluded.owner",
                (run_id, config["name"], config["data"]["name"], config["model"]["name"], str(config["model"]["cut"]),
                 defense, config["seed"], json.dumps(config, default=str), str(run_dir), now, now, owner))
            db.execute("COMMIT")

    def set_status(self, run_id: str, status: str, error: str | None = None, owner: str | None = None) -> bool:
        """Mark a run not finished. Never downgrades a finished run; with ``owner``, only the owner's row
        changes (a process that lost the run to another one cannot overwrite it). True if a row changed."""
        if status not in STATUSES or status == "finished":
            raise ValueError(f"set_status: bad status {status} (finish() records a finished run)")
        with self._connect() as db:
            cur = db.execute("UPDATE runs SET status=?, error=?, updated=? WHERE run_id=? AND status != 'finished'"
                             " AND (? IS NULL OR owner IS ?)", (status, error, time.time(), run_id, owner, owner))
            return cur.rowcount > 0

    def finish(self, run_id: str, metrics: dict[str, Any], owner: str | None = None) -> bool:
        with self._connect() as db:
            cur = db.execute("UPDATE runs SET status='finished', error=NULL, accuracy=?, metrics=?, updated=?"
                             " WHERE run_id=? AND (? IS NULL OR owner IS ?)",
                             (metrics.get("accuracy"), json.dumps(metrics), time.time(), run_id, owner, owner))
            return cur.rowcount > 0

    def delete(self, run_id: str) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM runs WHERE run_id=?", (run_id,))

    def restore(self, row: dict[str, Any]) -> None:
        """Insert a row as it was (``rebuild``): ``metrics`` and ``config`` as dicts."""
        cols = ("run_id", "status", "name", "dataset", "model", "cut", "defense", "seed", "accuracy", "metrics",
                "config", "run_dir", "error", "started", "updated", "owner")
        vals = [json.dumps(row[c]) if c in ("metrics", "config") and row.get(c) is not None else row.get(c)
                for c in cols]
        with self._connect() as db:
            db.execute(f"INSERT OR REPLACE INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", vals)

    def get(self, run_id: str) -> dict[str, Any] | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return self._row(row) if row else None

    def runs(self, status: str | None = None) -> list[dict[str, Any]]:
        with self._connect() as db:
            if status:
                rows = db.execute("SELECT * FROM runs WHERE status=? ORDER BY started", (status,)).fetchall()
            else:
                rows = db.execute("SELECT * FROM runs ORDER BY started").fetchall()
        return [self._row(r) for r in rows]

    @staticmethod
    def _row(row: sqlite3.Row) -> dict[str, Any]:
        d = dict(row)
        for k in ("metrics", "config"):
            d[k] = json.loads(d[k]) if d.get(k) else None
        return d


# -- rebuilding the store from the run folders ---------------------------------------------------------------
CONFIG_FILE = "config.yaml"


def row_from_folder(run_dir: Path) -> dict[str, Any] | None:
    """The store row a run folder stands for: ``finished`` with its metrics when it holds ``metrics.json``,
    ``interrupted`` (so that a rerun resumes from its checkpoints) when it holds only ``config.yaml``; None for
    a folder that is no run (or whose files cannot be read: logged by the caller)."""
    import yaml

    cfg_f, met_f = run_dir / CONFIG_FILE, run_dir / METRICS_FILE
    if not cfg_f.is_file():
        return None
    config = yaml.safe_load(cfg_f.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_f}: not a run config")
    metrics = json.loads(met_f.read_text()) if met_f.is_file() else None
    if metrics is not None and metrics.get("run_id") not in (None, run_dir.name):
        raise ValueError(f"{met_f}: belongs to run {metrics.get('run_id')}, not to its folder {run_dir.name}")
    d = config.get("defense") or {}
    names = d.get("name", "none") if isinstance(d, dict) else "none"
    label = metrics.get("defense") if metrics else "+".join(names if isinstance(names, list) else [str(names)])
    data, model = config.get("data") or {}, config.get("model") or {}
    started = cfg_f.stat().st_mtime
    return {"run_id": run_dir.name, "status": "finished" if metrics is not None else "interrupted",
            "name": config.get("name"), "dataset": data.get("name"), "model": model.get("name"),
            "cut": str(model.get("cut")), "defense": label, "seed": config.get("seed"),
            "accuracy": metrics.get("accuracy") if metrics else None, "metrics": metrics, "config": config,
            "run_dir": str(run_dir.resolve()), "started": started,
            "updated": met_f.stat().st_mtime if metrics is not None else started, "owner": None,
            "error": None if metrics is not None else "restored by `splitveil store rebuild`: not finished"}


def rebuild_store(out: str | Path) -> dict[str, Any]:
    """Rebuild ``<out>/results.sqlite`` from the run folders: a row per folder with ``config.yaml`` (finished
    with its ``metrics.json``, else interrupted). The old store (with its -wal/-shm files) is moved aside as
    ``results.sqlite.corrupt-<time>``, never deleted. Hold no run of ``out`` meanwhile. Returns
    ``{"store", "moved", "finished", "interrupted", "skipped": {folder: why}}``."""
    import yaml

    folder = Path(out)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder of runs")
    db = folder / DB_NAME
    moved = None
    if db.exists():
        moved = db.with_name(f"{DB_NAME}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(db, moved)
        for ext in ("-wal", "-shm"):
            side = db.with_name(DB_NAME + ext)
            if side.exists():
                os.replace(side, moved.with_name(moved.name + ext))
    store = ResultsStore(db)
    counts = {"finished": 0, "interrupted": 0}
    skipped: dict[str, str] = {}
    for run_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            row = row_from_folder(run_dir)
        except (OSError, ValueError, yaml.YAMLError) as e:   # json errors are ValueErrors
            skipped[run_dir.name] = f"{type(e).__name__}: {e}"
            continue
        if row is None:
            continue
        store.restore(row)
        counts[row["status"]] += 1
    return {"store": str(db), "moved": str(moved) if moved else None, **counts, "skipped": skipped}


# -- one lock per run: only one process runs a given run id in a given --out at a time ----------------------

class RunBusyError(RuntimeError):
    """Another process holds the run's lock."""


_HELD: dict[str, int] = {}   # lock files held by this process -> depth (the lock is re-entrant in a process)


def lock_path(out: str | Path, run_id: str) -> Path:
    return Path(out) / ".locks" / f"{run_id}.lock"


def owner_id() -> str:
    return f"{os.getpid()}@{socket.gethostname()}"


@contextmanager
def run_lock(out: str | Path, run_id: str) -> Iterator[None]:
    """Hold ``<out>/.locks/<run-id>.lock`` (flock: released by the OS if the process dies). The file names the
    holder (pid host start-time) while held. Raises :class:`RunBusyError` if another process holds it."""
    lp = lock_path(out, run_id)
    key = str(lock_path(Path(out).resolve(), run_id))
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    lp.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = lp.read_text().split()
            except OSError:
                holder = []
            who = f" (pid {holder[0]} on {holder[1]})" if len(holder) >= 2 else ""
            raise RunBusyError(f"run {run_id} is running in another process{who}; wait for it to finish, or "
                               f"use another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()} {time.time():.3f}\n".encode())
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)
