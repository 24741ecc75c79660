"""The results store: one SQLite row per run (WAL mode, safe for concurrent writers)."""
from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

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
    started    REAL, updated REAL
);
"""
STATUSES = ("running", "finished", "failed", "interrupted")


class ResultsStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA busy_timeout=60000")
            yield db
        finally:
            db.close()

    def start(self, run_id: str, config: dict[str, Any], run_dir: str | Path, defense: str) -> None:
        now = time.time()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "INSERT INTO runs (run_id, status, name, dataset, model, cut, defense, seed, config, run_dir, started, updated)"
                " VALUES (?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(run_id) DO UPDATE SET status='running', error=NULL, metrics=NULL, accuracy=NULL,"
                " config=excluded.config, run_dir=excluded.run_dir, updated=excluded.updated",
                (run_id, config["name"], config["data"]["name"], config["model"]["name"], str(config["model"]["cut"]),
                 defense, config["seed"], json.dumps(config, default=str), str(run_dir), now, now))
            db.execute("COMMIT")

    def set_status(self, run_id: str, status: str, error: str | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status}")
        with self._connect() as db:
            db.execute("UPDATE runs SET status=?, error=?, updated=? WHERE run_id=?", (status, error, time.time(), run_id))

    def finish(self, run_id: str, metrics: dict[str, Any]) -> None:
        with self._connect() as db:
            db.execute("UPDATE runs SET status='finished', error=NULL, accuracy=?, metrics=?, updated=? WHERE run_id=?",
                       (metrics.get("accuracy"), json.dumps(metrics), time.time(), run_id))

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
