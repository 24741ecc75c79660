"""docs/results.md is generated from the committed exports (benchmarks/results_doc.py) and the exports' gains are
what today's code computes from their runs: a hand edit of the doc, a stale doc or a stale gains.csv fails here."""
import csv
import importlib.util
import io
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


results_doc = _load("results_doc")


def test_results_md_is_what_the_exports_generate():
    doc = (ROOT / "docs" / "results.md").read_text()
    exports = results_doc.exports_of(doc)
    assert exports, "docs/results.md names no export"
    assert doc == results_doc.render(exports), ("docs/results.md differs from what its exports generate: run "
                                                "`python benchmarks/results_doc.py` (never edit it by hand)")


def test_the_doc_flags_wide_segments_as_the_report_does():
    from splitveil.report.equal_utility import WIDE_SEGMENT

    assert results_doc.WIDE_SEGMENT == WIDE_SEGMENT
    row = {"segment_width": repr(WIDE_SEGMENT + 0.01)}
    assert "wide" in results_doc.segment(row) and "wide" not in results_doc.segment({"segment_width": "0.05"})


def test_a_changed_export_number_changes_the_doc(tmp_path):
    doc = (ROOT / "docs" / "results.md").read_text()
    # the first export with a gain inside a frontier that has an interval (a study just started has none yet)
    src, rows, row = next((src, rows, r) for src in (ROOT / e for e in results_doc.exports_of(doc))
                          for rows in [list(csv.DictReader((src / "gains.csv").open()))] for r in rows
                          if r["where"] == "inside" and r["ci_low"] and r["reference"] != r["defense"])
    dst = tmp_path / src.name
    dst.mkdir()
    for n in ("results.json", "summary.csv"):
        (dst / n).write_text((src / n).read_text())
    before = results_doc.interval(row)
    row["ci_low"] = repr(float(row["ci_low"]) - 0.1)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    (dst / "gains.csv").write_text(buf.getvalue())
    assert results_doc.interval(row) != before
    assert results_doc.interval(row) in results_doc.render([str(dst)])
    assert results_doc.interval(row) not in results_doc.render([str(src)])


@pytest.mark.parametrize("export", results_doc.exports_of((ROOT / "docs" / "results.md").read_text()))
def test_each_exports_gains_are_what_the_code_computes_from_its_runs(export, tmp_path):
    """gains.csv recomputed from results.json with today's code (t intervals, flagged runs left out)."""
    ps = _load("proposal_study")
    from splitveil.report.build import build, render_gains_csv
    from splitveil.report.equal_utility import match_reference

    folder = ROOT / export
    runs = json.loads((folder / "results.json").read_text())["runs"]
    db = ps.write_store(runs, tmp_path / folder.name)
    labels = sorted({r["defense"] for r in runs})
    refs = [r for r in ps.REFERENCES if match_reference(labels, r) == r]
    rep = build(db, figures=False, references=refs)
    fresh = list(csv.DictReader(io.StringIO(render_gains_csv(rep))))
    stored = list(csv.DictReader((folder / "gains.csv").open()))
    key = lambda r: (r["dataset"], r["reference"], r["label"])   # noqa: E731
    assert sorted(map(key, fresh)) == sorted(map(key, stored))
    by = {key(r): r for r in stored}
    for r in fresh:
        s = by[key(r)]
        assert (r["where"], r["ci_method"], r["flags"], r["n"]) == (s["where"], s["ci_method"], s["flags"], s["n"]), key(r)
        for col in ("gain", "ci_low", "ci_high", "segment_width"):
            a, b = r.get(col, ""), s.get(col, "")
            assert (a == "") == (b == ""), (key(r), col)
            if a:
                assert math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12), (key(r), col, a, b)
