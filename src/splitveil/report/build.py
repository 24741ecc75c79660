"""The full report of a results store: per-dataset tables (mean +- std over seeds, grouped by defense and the
swept parameters), trade-off / ablation / reconstruction figures, written as markdown, CSV, LaTeX and one
self-contained HTML file (images embedded as base64; opens in a browser with no server)."""
from __future__ import annotations

import base64
import csv
import html
import io
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .aggregate import Group, RunRecord, attack_names, group_runs, load_runs, primary_attack, varying_fields
from .plots import ablation_fields, ablation_plot, recon_comparison, tradeoff_plot
from .tables import collect, columns, to_csv, to_markdown

FORMATS = ("md", "csv", "latex", "html")
DIGITS = {"accuracy": 4, "mse": 4, "psnr": 2, "ssim": 4}


@dataclass
class Figure:
    name: str          # file name under report_files/
    title: str
    png: bytes


@dataclass
class DatasetSection:
    dataset: str
    groups: list[Group]
    metrics: list[str]                  # metric keys shown, e.g. accuracy, inverse_network.mse
    params: list[str]                   # swept fields shown as columns
    figures: list[Figure] = field(default_factory=list)
    pareto: list[str] = field(default_factory=list)   # labels of the groups on the Pareto front


@dataclass
class Report:
    title: str
    runs: list[RunRecord]
    sections: list[DatasetSection]
    attack: str | None
    records: list[dict[str, Any]]       # every run of the store (flat), any status


def _metric_digits(metric: str) -> int:
    return DIGITS.get(metric.split(".")[-1], 4)


def fmt_stat(mean: float | None, std: float | None, metric: str, pm: str = " ± ") -> str:
    if mean is None:
        return ""
    d = _metric_digits(metric)
    return f"{mean:.{d}f}" if std is None else f"{mean:.{d}f}{pm}{std:.{d}f}"


def _fmt_value(v: Any) -> str:
    if isinstance(v, list):
        return "+".join(map(str, v))
    if isinstance(v, float):
        return f"{v:g}"
    return "" if v is None else str(v)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def build(results: str | Path, attack: str | None = None, figures: bool = True) -> Report:
    runs = load_runs(results)
    records = collect(results)
    attack = primary_attack(runs, attack)
    fields = varying_fields(runs)
    groups = group_runs(runs, fields)
    metrics = ["accuracy"] + [f"{a}.{m}" for a in attack_names(runs) for m in ("mse", "psnr", "ssim")]
    sections = []
    for ds in sorted({g.dataset for g in groups}):
        gs = [g for g in groups if g.dataset == ds]
        # a column for every swept field that varies within this dataset
        shown = [k for k in fields if len({repr(g.params.get(k)) for g in gs}) > 1]
        sec = DatasetSection(ds, gs, [m for m in metrics if any(g.stat(m)[0] is not None for g in gs)], shown)
        if figures and attack:
            png, front = tradeoff_plot(gs, attack, f"{ds}: accuracy vs {attack} MSE (mean ± std over seeds)")
            if png:
                sec.figures.append(Figure(f"tradeoff_{_slug(ds)}.png", f"{ds}: accuracy vs {attack} MSE", png))
                sec.pareto = [gs[i].label for i in front]
            for fld in ablation_fields(gs):
                png = ablation_plot(gs, fld, attack, f"{ds}: {fld}")
                if png:
                    sec.figures.append(Figure(f"ablation_{_slug(ds)}_{_slug(fld)}.png", f"{ds}: ablation of {fld}", png))
            png = recon_comparison(gs, attack, title=f"{ds}: {attack} reconstructions per defense (lowest seed)")
            if png:
                sec.figures.append(Figure(f"recon_{_slug(ds)}.png", f"{ds}: reconstructions per defense", png))
        sections.append(sec)
    folder = Path(results) if Path(results).is_dir() else Path(results).parent
    return Report(f"splitveil report: {folder.name or folder}", runs, sections, attack, records)


# -- renderers -----------------------------------------------------------------------------------------

def _split_params(sec: DatasetSection) -> tuple[list[str], list[str]]:
    """Swept defense parameters (shown together in one column) and the other swept fields (one column each)."""
    return [p for p in sec.params if p.startswith("defense.")], [p for p in sec.params if not p.startswith("defense.")]


def _defense_params(g: Group, fields: list[str]) -> str:
    return " ".join(f"{p[len('defense.'):]}={_fmt_value(g.params[p])}" for p in fields if g.params.get(p) is not None)


def _header(sec: DatasetSection) -> list[str]:
    dfields, other = _split_params(sec)
    return ["defense"] + (["params"] if dfields else []) + other + ["n"] + [m.replace(".", " ") for m in sec.metrics]


def _param_cells(sec: DatasetSection, g: Group) -> list[str]:
    dfields, other = _split_params(sec)
    return [g.defense] + ([_defense_params(g, dfields)] if dfields else []) + [_fmt_value(g.params.get(p)) for p in other]


def _cells(sec: DatasetSection, g: Group, pm: str = " ± ") -> list[str]:
    return _param_cells(sec, g) + [str(g.n)] + [fmt_stat(*g.stat(m), m, pm) for m in sec.metrics]


def render_markdown(rep: Report, files_dir: str = "report_files") -> str:
    out = [f"# {rep.title}", "", f"{len(rep.runs)} finished runs in {sum(len(s.groups) for s in rep.sections)} "
           f"groups; mean ± sample std over seeds (n = seeds per group). Attack for the trade-off: {rep.attack}.", ""]
    for sec in rep.sections:
        g0 = sec.groups[0]
        out += [f"## {sec.dataset}", "", f"model {g0.model}, cut {g0.cut}", ""]
        hdr = _header(sec)
        out += ["| " + " | ".join(hdr) + " |", "|" + "|".join("---" for _ in hdr) + "|"]
        out += ["| " + " | ".join(_cells(sec, g)) + " |" for g in sec.groups]
        out.append("")
        if sec.pareto:
            out += [f"Pareto front (accuracy vs {rep.attack} MSE): " + ", ".join(sec.pareto), ""]
        for f in sec.figures:
            out += [f"![{f.title}]({files_dir}/{f.name})", ""]
    out += ["## All runs", "", to_markdown(rep.records, columns(rep.records)) if rep.records else "(none)"]
    return "\n".join(out)


def render_summary_csv(rep: Report) -> str:
    params: list[str] = []
    metrics: list[str] = []
    for sec in rep.sections:
        params += [p for p in sec.params if p not in params]
        metrics += [m for m in sec.metrics if m not in metrics]
    cols = ["dataset", "model", "cut", "defense"] + params + ["n", "seeds"] + \
        [f"{m}_{s}" for m in metrics for s in ("mean", "std")] + ["run_ids"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for sec in rep.sections:
        for g in sec.groups:
            row = [g.dataset, g.model, g.cut, g.defense] + [_fmt_value(g.params.get(p)) for p in params] + \
                  [g.n, " ".join(map(str, g.seeds))]
            for m in metrics:
                mean, std = g.stat(m)
                row += ["" if mean is None else repr(mean), "" if std is None else repr(std)]
            row.append(" ".join(r.run_id for r in g.runs))
            w.writerow(row)
    return buf.getvalue()


_TEX = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
        "^": r"\textasciicircum{}", "\\": r"\textbackslash{}", "±": r"$\pm$"}


def tex_escape(text: str) -> str:
    return "".join(_TEX.get(c, c) for c in str(text))


def render_latex(rep: Report) -> str:
    """One booktabs table per dataset (``\\usepackage{booktabs}``); include with ``\\input{report.tex}``."""
    out = [f"% {rep.title}: generated by `splitveil report --format latex` on {time.strftime('%Y-%m-%d %H:%M')}",
           "% needs \\usepackage{booktabs}; values are mean $\\pm$ sample std over seeds (n seeds)", ""]
    for sec in rep.sections:
        hdr = _header(sec)
        out += ["\\begin{table}[t]", "\\centering", "\\small",
                f"\\caption{{{tex_escape(sec.dataset)}: accuracy and reconstruction quality per defense "
                f"(mean $\\pm$ std over seeds).}}", f"\\label{{tab:{_slug(sec.dataset)}}}",
                "\\begin{tabular}{" + "l" * (len(hdr) - 1 - len(sec.metrics)) + "r" + "c" * len(sec.metrics) + "}",
                "\\toprule",
                " & ".join(tex_escape(h) for h in hdr) + " \\\\", "\\midrule"]
        for g in sec.groups:
            cells = [tex_escape(c) for c in _param_cells(sec, g) + [str(g.n)]]
            for m in sec.metrics:
                mean, std = g.stat(m)
                d = _metric_digits(m)
                cells.append("" if mean is None else (f"${mean:.{d}f}$" if std is None else f"${mean:.{d}f} \\pm {std:.{d}f}$"))
            out.append(" & ".join(cells) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.25em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:1em 0}th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}tr.pareto td{background:#eef7ee}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #ddd}figcaption{font-size:.85em;color:#555}
.note{color:#555;font-size:.9em}details{margin:1em 0}
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img');
  var ok = 0;
  imgs.forEach(function (im) { if (im.complete && im.naturalWidth > 0) ok++; });
  document.body.setAttribute('data-images', String(imgs.length));
  document.body.setAttribute('data-images-loaded', String(ok));
  document.body.setAttribute('data-tables', String(document.querySelectorAll('table').length));
});
"""


def _html_table(header: list[str], rows: list[list[str]], classes: list[str] | None = None, cls: str = "") -> str:
    e = html.escape
    out = [f'<table class="{cls}">', "<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead>", "<tbody>"]
    for i, r in enumerate(rows):
        c = f' class="{classes[i]}"' if classes and classes[i] else ""
        out.append(f"<tr{c}>" + "".join(f"<td>{e(str(x))}</td>" for x in r) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def render_html(rep: Report) -> str:
    e = html.escape
    body = [f"<h1>{e(rep.title)}</h1>",
            f'<p class="note">{len(rep.runs)} finished runs; values are mean ± sample standard deviation over seeds '
            f"(n = seeds per group). Trade-off attack: {e(str(rep.attack))}. Rows on the Pareto front are shaded. "
            f"Generated {e(time.strftime('%Y-%m-%d %H:%M'))}.</p>"]
    for sec in rep.sections:
        g0 = sec.groups[0]
        body.append(f'<section class="dataset" id="{e(_slug(sec.dataset))}"><h2>{e(sec.dataset)}</h2>')
        body.append(f'<p class="note">model {e(g0.model)}, cut {e(g0.cut)}</p>')
        classes = ["pareto" if g.label in sec.pareto else "" for g in sec.groups]
        body.append(_html_table(_header(sec), [_cells(sec, g) for g in sec.groups], classes, "summary"))
        for f in sec.figures:
            data = base64.b64encode(f.png).decode()
            body.append(f'<figure><img alt="{e(f.title)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{e(f.title)}</figcaption></figure>")
        body.append("</section>")
    if rep.records:
        cols = columns(rep.records)
        rows = [[_cell(r.get(c)) for c in cols] for r in rep.records]
        body.append("<details><summary>All runs (" + str(len(rows)) + ")</summary>" + _html_table(cols, rows, cls="runs")
                    + "</details>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{e(rep.title)}</title><style>{_CSS}</style></head>\n<body>\n" + "\n".join(body)
            + f"\n<script>{_SCRIPT}</script>\n</body></html>\n")


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def build_report(results: str | Path, formats: list[str] | tuple[str, ...] = FORMATS, out: str | Path | None = None,
                 attack: str | None = None) -> dict[str, Path]:
    """Write the requested formats (md, csv, latex, html) into ``out`` (default: beside the store).

    md -> report.md (+ figures in report_files/), csv -> report.csv (one row per run) and summary.csv (one
    row per group), latex -> report.tex, html -> report.html (self-contained). Returns name -> path."""
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ValueError(f"unknown report format '{bad[0]}'; valid: {', '.join(FORMATS)}")
    folder = Path(out) if out else (Path(results) if Path(results).is_dir() else Path(results).parent)
    folder.mkdir(parents=True, exist_ok=True)
    rep = build(results, attack, figures=("md" in formats or "html" in formats))
    written: dict[str, Path] = {}
    if "md" in formats:
        files = folder / "report_files"
        files.mkdir(exist_ok=True)
        for sec in rep.sections:
            for f in sec.figures:
                (files / f.name).write_bytes(f.png)
                written[f.name] = files / f.name
        written["md"] = folder / "report.md"
        written["md"].write_text(render_markdown(rep))
    if "csv" in formats:
        written["csv"] = folder / "report.csv"
        written["csv"].write_text(to_csv(rep.records, columns(rep.records)) if rep.records else "")
        written["summary_csv"] = folder / "summary.csv"
        written["summary_csv"].write_text(render_summary_csv(rep))
    if "latex" in formats:
        written["latex"] = folder / "report.tex"
        written["latex"].write_text(render_latex(rep))
    if "html" in formats:
        written["html"] = folder / "report.html"
        written["html"].write_text(render_html(rep))
    return written
