"""Export the proposal study's finished runs and build its tables and figures (idempotent: re-run it as
points finish; commit the output folder so that a study cut off loses nothing).

    python benchmarks/proposal_study.py runs/proposal_study-cpu
    python benchmarks/proposal_study.py runs/proposal_study --dest benchmarks/results/proposal_study-gpu

Writes to --dest (default benchmarks/results/proposal_study/):
  results.json   every finished run ever exported: run_id, name, status, config and the full metrics.json
                 (merged with the previous export by run id, so runs whose folder is gone are kept)
  results.csv    one flat row per run: defense, its parameters, seed, accuracy, each attack's MSE / PSNR / SSIM,
                 the worst case and its attack, flags, CEM diagnostics (std(z)/sigma, ...), edge cost
  report.md, report.csv, summary.csv, gains.csv, report.tex, report_files/*.png|pdf
                 the grouped report with equal-utility gains over gaussian_noise and over each CEM variant
                 (splitveil report --format md,csv,latex --reference ...), built from the merged export

--include EXPORT_DIR:DEFENSE merges one arm of another export (same protocol, run later) into this one;
--exclude RUN_ID leaves an included run out (e.g. a check point that repeats a setting already in the export).
Nothing here trains or attacks anything."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from splitveil.results.store import ResultsStore  # noqa: E402
from splitveil.report.build import build_report  # noqa: E402
from splitveil.report.equal_utility import match_reference  # noqa: E402
from splitveil.report.results import run_summary  # noqa: E402
from splitveil.report.tables import columns, to_csv  # noqa: E402

REFERENCES = ["gaussian_noise", "gaussian_noise+cem_gmm", "gaussian_noise+cem_slot_cross", "gaussian_noise+cem_gated_pool"]


def finished_rows(runs: Path) -> list[dict]:
    db = runs / "results.sqlite" if runs.is_dir() else runs
    if not db.exists():
        return []
    return [r for r in ResultsStore(db).runs("finished") if r.get("metrics")]


def merge_export(dest: Path, rows: list[dict]) -> list[dict]:
    """The previous export's runs updated with ``rows`` (same run id: the store's row wins), sorted by run id."""
    path = dest / "results.json"
    merged: dict[str, dict] = {}
    if path.exists():
        for r in json.loads(path.read_text()).get("runs", []):
            merged[r["run_id"]] = r
    for r in rows:
        merged[r["run_id"]] = {k: r.get(k) for k in ("run_id", "name", "status", "dataset", "model", "cut", "defense",
                                                      "seed", "run_dir", "config", "metrics")}
    return [merged[k] for k in sorted(merged)]


def write_store(runs: list[dict], folder: Path) -> Path:
    """A results store holding exactly ``runs`` (to build the report from the export)."""
    store = ResultsStore(folder / "results.sqlite")
    for r in runs:
        run_dir = Path(r["run_dir"]) if r.get("run_dir") else folder / r["run_id"]
        store.start(r["run_id"], r["config"], run_dir, r["defense"])
        store.finish(r["run_id"], r["metrics"])
    return folder / "results.sqlite"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="?", default="runs/proposal_study-cpu",
                    help="the study's runs folder (holding results.sqlite); may be missing: the export alone is reported")
    ap.add_argument("--dest", default=str(ROOT / "benchmarks" / "results" / "proposal_study"))
    ap.add_argument("--interval", choices=["t", "bootstrap"], default="t",
                    help="gain intervals: t over seeds (default) or the former percentile bootstrap")
    ap.add_argument("--bootstrap", type=int, default=2000, help="--interval bootstrap: replicates per gain interval")
    ap.add_argument("--include", action="append", default=[], metavar="EXPORT_DIR:DEFENSE",
                    help="also merge the runs of another export (its results.json) whose defense label is DEFENSE "
                         "(e.g. an arm run later with the same protocol); repeatable")
    ap.add_argument("--exclude", action="append", default=[], metavar="RUN_ID",
                    help="leave this run out of the --include'd runs (e.g. a check point rerun); repeatable")
    args = ap.parse_args(argv)
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    rows = finished_rows(Path(args.runs))
    for inc in args.include:
        folder, _, label = inc.rpartition(":")
        if not folder or not label:
            ap.error(f"--include {inc!r}: expected EXPORT_DIR:DEFENSE")
        other = [r for r in json.loads((Path(folder) / "results.json").read_text()).get("runs", [])
                 if r.get("defense") == label]
        if not other:
            ap.error(f"--include {inc!r}: no run with defense {label!r} in {Path(folder) / 'results.json'}")
        kept = [r for r in other if r["run_id"] not in args.exclude]
        rows += kept
        print(f"{len(kept)} runs of {label} from {folder}" + (f" ({len(other) - len(kept)} excluded)" if len(kept) < len(other) else ""))
    runs = merge_export(dest, rows)
    tmp = dest / "results.json.tmp"
    source = str(args.runs)
    if not rows and (dest / "results.json").exists():   # a rebuild from the export alone keeps where it came from
        source = json.loads((dest / "results.json").read_text()).get("source", source)
    tmp.write_text(json.dumps({"source": source, "runs": runs}, indent=1, default=str))
    tmp.replace(dest / "results.json")
    flat = [run_summary(r) for r in runs]
    (dest / "results.csv").write_text(to_csv(flat, columns(flat)) if flat else "")
    print(f"{len(rows)} finished runs in {args.runs}; {len(runs)} in the export {dest / 'results.json'}")
    if not runs:
        return 0
    tmpdir = Path(tempfile.mkdtemp(prefix="proposal_study-"))
    work = tmpdir / dest.name                      # the report's title names this folder
    try:
        db = write_store(runs, work)
        labels = sorted({r["defense"] for r in runs})
        refs = [r for r in REFERENCES if match_reference(labels, r) == r]
        written = build_report(db, ["md", "csv", "latex"], dest, references=refs or ["none"], n_boot=args.bootstrap,
                               interval=args.interval)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    for name, path in written.items():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
