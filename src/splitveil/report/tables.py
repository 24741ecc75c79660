"""Tables of recorded runs: flat rows from the results store, markdown and CSV."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ..results.records import EdgeCost
from ..results.store import open_store, results_paths
from .results import run_summary

BASE_COLUMNS = ["run_id", "status", "dataset", "model", "cut", "defense", "seed", "accuracy"]
COST_COLUMNS = list(EdgeCost.KEYS)
# the printed / report.md per-run table (report.csv keeps every column)
DEFAULT_COLUMNS = ["run_id", "status", "name", "dataset", "defense", "seed", "accuracy", "worst MSE", "worst attack",
                   "worst PSNR", "worst SSIM", "mean-image MSE", "flags"]
_DEFAULT_SOURCE = {"defense": "defense_desc", "worst MSE": "worst.mse", "worst attack": "worst.mse.attack",
                   "worst PSNR": "worst.psnr", "worst SSIM": "worst.ssim", "mean-image MSE": "mean_image.mse"}


def flatten_run(row: dict[str, Any]) -> dict[str, Any]:
    """One store row -> one flat record (attack metrics as ``<attack>.mse``, the worst case as ``worst.mse`` and
    ``worst.mse.attack``, flags, CEM diagnostics as ``cem.<key>``, cost); see ``results.run_summary``."""
    return run_summary(row)


def default_view(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The narrow per-run view (DEFAULT_COLUMNS): the defense with its strength parameter, the worst case over
    the attack suite and the attack that achieved it, the mean-image baseline and the flags."""
    return [{c: r.get(_DEFAULT_SOURCE.get(c, c)) for c in DEFAULT_COLUMNS} for r in records]


def collect(results: str | Path, status: str | None = None) -> list[dict[str, Any]]:
    """``flatten_run`` of every run of a store (``results``: a runs folder or its ``results.sqlite``)."""
    return [flatten_run(r) for r in open_store(results).runs(status)]


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


def md_escape(text: Any) -> str:
    """A value safe inside a markdown table cell: no HTML, no cell breaks (``|``), no line breaks, no
    emphasis / code / link syntax from a run name (``_`` inside words is left alone: CommonMark ignores it)."""
    s = str(text).replace("\r", " ").replace("\n", " ")
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for ch in "\\|`*":
        s = s.replace(ch, "\\" + ch)
    return s.replace("](", "]\\(")       # no [text](link)


def to_markdown(records: list[dict[str, Any]], cols: list[str] | None = None) -> str:
    cols = cols or columns(records)
    lines = ["| " + " | ".join(md_escape(c) for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in records:
        lines.append("| " + " | ".join(md_escape(_fmt(r.get(c))) for c in cols) + " |")
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
    """Write ``report.md`` (the narrow per-run table, DEFAULT_COLUMNS) and ``report.csv`` (every column) beside
    the store; returns (markdown, md path, csv path)."""
    records = collect(results)
    folder, _ = results_paths(results)
    cols = columns(records) if records else BASE_COLUMNS
    md = to_markdown(default_view(records), DEFAULT_COLUMNS)
    md_path, csv_path = folder / "report.md", folder / "report.csv"
    md_path.write_text(md)
    csv_path.write_text(to_csv(records, cols))
    return md, md_path, csv_path
