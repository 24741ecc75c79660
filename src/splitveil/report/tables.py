"""Tables of recorded runs: flat rows from the results store, markdown and CSV."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ..experiments.store import ResultsStore

BASE_COLUMNS = ["run_id", "status", "dataset", "model", "cut", "defense", "seed", "accuracy"]
COST_COLUMNS = ["encoder_params", "encoder_flops", "latency_ms", "payload_bytes"]


def flatten_run(row: dict[str, Any]) -> dict[str, Any]:
    """One store row -> one flat record (attack metrics as ``<attack>.mse`` etc.)."""
    m = row.get("metrics") or {}
    rec: dict[str, Any] = {k: row.get(k) for k in BASE_COLUMNS}
    if m:
        rec["cut"] = m.get("cut", rec["cut"])
    for name, res in (m.get("attacks") or {}).items():
        for k in ("mse", "mse_std", "psnr", "ssim"):
            rec[f"{name}.{k}"] = res.get(k)
    base = (m.get("baseline") or {}).get("mean_image")
    if base:
        rec["mean_image.mse"] = base.get("mse")
    for k in COST_COLUMNS:
        rec[k] = (m.get("cost") or {}).get(k)
    rec["train_s"] = (m.get("timings") or {}).get("train_s")
    return rec


def collect(results: str | Path, status: str | None = None) -> list[dict[str, Any]]:
    path = Path(results)
    if path.is_dir():
        path = path / "results.sqlite"
    if not path.exists():
        raise FileNotFoundError(f"no results store at {path} (run `splitveil run ... --out {path.parent}` first)")
    return [flatten_run(r) for r in ResultsStore(path).runs(status)]


def columns(records: list[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for r in records:
        cols += [k for k in r if k not in cols]
    return cols


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


def to_markdown(records: list[dict[str, Any]], cols: list[str] | None = None) -> str:
    cols = cols or columns(records)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in records:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def to_csv(records: list[dict[str, Any]], cols: list[str] | None = None) -> str:
    cols = cols or columns(records)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in records:
        w.writerow({c: r.get(c) for c in cols})
    return buf.getvalue()


def write_report(results: str | Path) -> tuple[str, Path, Path]:
    """Write ``report.md`` and ``report.csv`` beside the store; returns (markdown, md path, csv path)."""
    records = collect(results)
    folder = Path(results) if Path(results).is_dir() else Path(results).parent
    cols = columns(records) if records else BASE_COLUMNS
    md = to_markdown(records, cols)
    md_path, csv_path = folder / "report.md", folder / "report.csv"
    md_path.write_text(md)
    csv_path.write_text(to_csv(records, cols))
    return md, md_path, csv_path
