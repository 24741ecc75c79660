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

from ..results.records import IMAGE_METRICS, EdgeCost
from ..results.store import results_paths
from .aggregate import IGNORED_FIELDS, Group, GroupedRun, attack_names, group_runs, load_runs, primary_attack, varying_fields
from .equal_utility import WORST, GainAnalysis, analyse_groups, context_key, match_reference
from .plots import ablation_fields, ablation_figure, cost_figure, recon_figure, render, tradeoff_figure
from .results import flag_text
from .tables import DEFAULT_COLUMNS, collect, columns, default_view, md_escape, to_csv, to_markdown

FORMATS = ("md", "csv", "latex", "html")
DIGITS = {"accuracy": 4, "mse": 4, "psnr": 2, "ssim": 4, "snr": 3, "within_var_over_tau": 3, "between_within_ratio": 3}
# the CEM controls shown beside the gain (metrics["defense_diagnostics"]): key -> column title
CONTROLS = {"cem.snr": "std(z)/sigma", "cem.between_within_ratio": "between/within", "cem.within_var_over_tau": "within var/tau"}
# config fields never listed among a table's fixed settings
HIDDEN_FIXED = IGNORED_FIELDS | {"eval.recon_images", "eval.latency_batch", "eval.latency_repeats", "eval.batch_size",
                                 "data.name", "model.name", "model.cut"}


@dataclass
class Figure:
    name: str          # file name under report_files/ (the PNG; a PDF of the same stem is written beside it)
    title: str
    png: bytes
    pdf: bytes | None = None


@dataclass
class DatasetSection:
    dataset: str
    groups: list[Group]
    metrics: list[str]                  # metric keys shown, e.g. accuracy, inverse_network.mse
    params: list[str]                   # swept fields shown as columns
    figures: list[Figure] = field(default_factory=list)
    pareto: list[str] = field(default_factory=list)   # labels of the groups on the Pareto front
    fixed: dict[str, Any] = field(default_factory=dict)       # settings shared by every run of the section
    analyses: list[GainAnalysis] = field(default_factory=list)  # equal-utility gains, one per (context, reference)
    controls: list[str] = field(default_factory=list)        # CEM control columns recorded in this section


@dataclass
class Report:
    title: str
    runs: list[GroupedRun]
    sections: list[DatasetSection]
    attack: str | None                  # the privacy axis: "worst" (worst case over the attacks) or an attack
    records: list[dict[str, Any]]       # every run of the store (flat), any status
    references: list[str] = field(default_factory=list)
    n_boot: int = 0
    csv_metrics: list[str] = field(default_factory=list)   # every metric of summary.csv (all attacks, cost)


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


def fixed_settings(runs: list[GroupedRun]) -> dict[str, Any]:
    """Config fields with one value across ``runs`` (the run group's fixed settings: data sizes, training
    budget, attack budget, ...), without bookkeeping fields."""
    if not runs:
        return {}
    keys = [k for k in runs[0].config if k not in HIDDEN_FIXED]
    out = {}
    for k in keys:
        vals = {repr(r.config.get(k)) for r in runs}
        if len(vals) == 1 and runs[0].config.get(k) not in (None, {}, [], ""):
            out[k] = runs[0].config[k]
    return out


def attack_budget(runs: list[GroupedRun]) -> dict[str, str]:
    """Attack name -> its settings in these runs (``epochs=4 batch_size=64 ...``; several when they differ)."""
    out: dict[str, list[str]] = {}
    for r in runs:
        per: dict[str, list[str]] = {}
        for k, v in sorted(r.config.items()):
            if k.startswith("attacks."):
                parts = k.split(".", 2)
                if len(parts) == 3:
                    per.setdefault(parts[1], []).append(f"{parts[2]}={_fmt_value(v)}")
                else:
                    per.setdefault(parts[1], [])
        for name, items in per.items():
            text = " ".join(items) or "defaults"
            if text not in out.setdefault(name, []):
                out[name].append(text)
    return {k: " | ".join(v) for k, v in out.items()}


def _undefended(gs: list[Group]) -> float | None:
    accs = [r.values["accuracy"] for g in gs if g.defense == "none" for r in g.runs if "accuracy" in r.values]
    return sum(accs) / len(accs) if accs else None


def _baseline(gs: list[Group]) -> float | None:
    vals = [r.values["mean_image.mse"] for g in gs for r in g.runs if r.values.get("mean_image.mse") is not None]
    return sum(vals) / len(vals) if vals else None


def resolve_references(groups: list[Group], references: list[str] | None) -> list[str]:
    """``None``/``["auto"]``: ``gaussian_noise`` when some group is a noise-only sweep (>= 2 settings);
    ``["none"]``: no gain tables; otherwise the names given (each must match a recorded defense)."""
    labels = sorted({g.defense for g in groups})
    if references is None or list(references) == ["auto"]:
        noise = [g for g in groups if g.defense == "gaussian_noise"]
        return ["gaussian_noise"] if len({context_key(g) for g in noise}) < len(noise) else []
    refs = [r for r in references if r not in ("none", "")]
    for r in refs:
        if match_reference(labels, r) is None:
            raise ValueError(f"--reference: '{r}' matches no recorded defense (or several); recorded: {', '.join(labels)}")
    return refs


def build(results: str | Path, attack: str | None = None, figures: bool = True, references: list[str] | None = None,
          n_boot: int = 2000, seed: int = 0, interval: str = "t") -> Report:
    """The report's content. ``attack``: the privacy axis, ``worst`` (default: the worst case over the attack
    suite, read from metrics["worst_case"] or computed) or an attack name. ``references``: defenses whose
    swept frontier the equal-utility gains are measured against (default ``auto``: gaussian_noise when it was
    swept); ``n_boot`` bootstrap replicates per interval."""
    runs = load_runs(results)
    records = collect(results)
    attack = primary_attack(runs, attack)
    fields = varying_fields(runs)
    groups = group_runs(runs, fields)
    names = attack_names(runs)
    axis = attack or WORST
    if axis == WORST:
        metrics = ["accuracy", "worst.mse", "worst.psnr", "worst.ssim"] + ([f"{a}.mse" for a in names] if len(names) > 1 else [])
    else:
        metrics = ["accuracy", f"{axis}.mse", f"{axis}.psnr", f"{axis}.ssim"] + [f"{a}.mse" for a in names if a != axis]
    metrics.append("mean_image.mse")
    refs = resolve_references(groups, references)
    sections = []
    for ds in sorted({g.dataset for g in groups}):
        gs = [g for g in groups if g.dataset == ds]
        # a column for every swept field that varies within this dataset
        shown = [k for k in fields if len({repr(g.params.get(k)) for g in gs}) > 1]
        for g in gs:
            g.label_fields = shown
        sec = DatasetSection(ds, gs, [m for m in metrics if any(g.stat(m)[0] is not None for g in gs)], shown)
        sec.fixed = fixed_settings([r for g in gs for r in g.runs])
        sec.controls = [c for c in CONTROLS if any(g.stat(c)[0] is not None for g in gs)]
        for ref in refs:
            for an in analyse_groups(gs, ref, metric=axis, n_boot=n_boot, seed=seed, method=interval).values():
                sec.analyses.append(an)
        if figures and attack:
            fig, front = tradeoff_figure(gs, axis, f"{ds}: accuracy vs {'worst-case' if axis == WORST else axis} MSE",
                                         analyses=sec.analyses, baseline_mse=_baseline(gs), undefended_acc=_undefended(gs))
            if fig is not None:
                png, pdf = render(fig)
                sec.figures.append(Figure(f"tradeoff_{_slug(ds)}.png", f"{ds}: accuracy vs {axis} MSE", png, pdf))
                sec.pareto = [gs[i].label for i in front]
            fig = cost_figure(gs, axis, f"{ds}: privacy vs edge cost")
            if fig is not None:
                png, pdf = render(fig)
                sec.figures.append(Figure(f"cost_{_slug(ds)}.png", f"{ds}: {axis} MSE vs encoder cost", png, pdf))
            for fld in ablation_fields(gs):
                fig = ablation_figure(gs, fld, axis, f"{ds}: {fld}")
                if fig is not None:
                    png, pdf = render(fig)
                    sec.figures.append(Figure(f"ablation_{_slug(ds)}_{_slug(fld)}.png", f"{ds}: ablation of {fld}", png, pdf))
            recon_attack = axis if axis != WORST else _most_common_worst(gs)
            fig = recon_figure(gs, recon_attack, title=f"{ds}: {recon_attack} reconstructions per defense (lowest seed)") \
                if recon_attack else None
            if fig is not None:
                png, pdf = render(fig)
                sec.figures.append(Figure(f"recon_{_slug(ds)}.png", f"{ds}: reconstructions per defense", png, pdf))
        sections.append(sec)
    folder, _ = results_paths(results)
    full = ["accuracy"] + [f"worst.{m}" for m in IMAGE_METRICS] + \
        [f"{a}.{m}" for a in names for m in IMAGE_METRICS] + ["mean_image.mse"] + list(EdgeCost.KEYS) + ["train_s"]
    full = [m for m in full if any(g.stat(m)[0] is not None for g in groups)]
    return Report(f"splitveil report: {folder.name or folder}", runs, sections, attack, records, refs, n_boot, full)


def _most_common_worst(gs: list[Group]) -> str | None:
    counts: dict[str, int] = {}
    for g in gs:
        for r in g.runs:
            a = r.worst_attack.get("mse")
            if a:
                counts[a] = counts.get(a, 0) + 1
    return max(counts, key=counts.get) if counts else None


def gain_rows(sec: DatasetSection) -> list[tuple[GainAnalysis, Group, Any]]:
    """(analysis, group, gain) for every group of the section scored against a reference."""
    out = []
    for an in sec.analyses:
        for g in sec.groups:
            gain = an.for_key(id(g))
            if gain is not None:
                out.append((an, g, gain))
    return out


GAIN_HEADER = ["reference", "defense", "params", "n", "accuracy", "MSE", "gain log(MSE/MSE_ref)", "95% CI", "MSE ratio",
               "in reference range", "flags"] + list(CONTROLS.values())


def fmt_gain_cells(an: GainAnalysis, g: Group, gain, sec: DatasetSection) -> list[str]:
    dfields, _ = _split_params(sec)
    if gain.gain is None:
        gtxt = "n/a"
        where = {"below": "no: below (not extrapolated)", "above": "no: above (not extrapolated)",
                 "none": "no: reference has < 2 settings"}[gain.where]
    else:
        gtxt, where = f"{gain.gain:+.3f}", "yes"
    ci = "" if gain.ci is None else f"[{gain.ci[0]:+.3f}, {gain.ci[1]:+.3f}]"
    if gain.gain is not None and gain.ci is None:
        ci = f"none ({gain.ci_kept:.0%} of replicates in range)" if gain.ci_kept is not None else f"none ({gain.ci_method})"
    ratio = "" if gain.mse_ratio is None else f"{gain.mse_ratio:.3f}"
    ctrl = [fmt_stat(*g.stat(c), c) for c in CONTROLS]
    return [an.reference, g.defense, _defense_params(g, dfields) if dfields else "", str(gain.n), f"{gain.accuracy:.4f}",
            f"{gain.mse:.4f}", gtxt, ci, ratio, where, _gain_flags(g, gain)] + ctrl


def _gain_flags(g: Group, gain) -> str:
    """The group's flags and, for a comparison across a frontier segment wider than 5 accuracy points, that."""
    wide = f"wide segment ({gain.bridge:.3f})" if gain.wide else ""
    return ", ".join(x for x in (flag_text(g.flags), wide) if x)


# -- renderers -----------------------------------------------------------------------------------------

def _split_params(sec: DatasetSection) -> tuple[list[str], list[str]]:
    """Swept defense parameters (shown together in one column) and the other swept fields (one column each)."""
    return [p for p in sec.params if p.startswith("defense.")], [p for p in sec.params if not p.startswith("defense.")]


def _defense_params(g: Group, fields: list[str]) -> str:
    return " ".join(f"{p[len('defense.'):]}={_fmt_value(g.params[p])}" for p in fields if g.params.get(p) is not None)


def _metric_title(m: str) -> str:
    return {"worst.mse": "worst MSE", "worst.psnr": "worst PSNR", "worst.ssim": "worst SSIM",
            "mean_image.mse": "mean-image MSE"}.get(m, m.replace(".", " "))


def _worst_col(sec: DatasetSection) -> bool:
    return "worst.mse" in sec.metrics


def _header(sec: DatasetSection) -> list[str]:
    dfields, other = _split_params(sec)
    return (["defense"] + (["params"] if dfields else []) + other + ["n"] + [_metric_title(m) for m in sec.metrics]
            + (["worst attack"] if _worst_col(sec) else []) + [CONTROLS[c] for c in sec.controls] + ["flags"])


def _param_cells(sec: DatasetSection, g: Group) -> list[str]:
    dfields, other = _split_params(sec)
    return [g.defense] + ([_defense_params(g, dfields)] if dfields else []) + [_fmt_value(g.params.get(p)) for p in other]


def _cells(sec: DatasetSection, g: Group, pm: str = " ± ") -> list[str]:
    return (_param_cells(sec, g) + [str(g.n)] + [fmt_stat(*g.stat(m), m, pm) for m in sec.metrics]
            + ([", ".join(g.worst_attacks("mse"))] if _worst_col(sec) else [])
            + [fmt_stat(*g.stat(c), c, pm) for c in sec.controls] + [flag_text(g.flags)])


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(md_escape(c) for c in cells) + " |"


def _fixed_lines(sec: DatasetSection) -> list[str]:
    runs = [r for g in sec.groups for r in g.runs]
    budget = attack_budget(runs)
    fixed = {k: v for k, v in sec.fixed.items() if not k.startswith("attacks.")}
    lines = ["Fixed settings: " + (", ".join(f"{k}={_fmt_value(v)}" for k, v in fixed.items()) or "(none)")]
    lines.append("Attack budget: " + ("; ".join(f"{a}: {b}" for a, b in budget.items()) or "(no attack)"))
    return lines


def _exclusion_lines(sec: DatasetSection) -> list[str]:
    """The runs kept out of the Pareto front, the equal-utility frontiers and the gains, with the reason (their
    rows stay in the table above, flagged)."""
    items = [f"{g.label}: {g.exclusion()}" for g in sec.groups if g.exclusion()]
    if not items:
        return []
    return ["Excluded from the Pareto front, the equal-utility frontiers and the gains (flagged runs measure no "
            "defense): " + "; ".join(items)]


def _gain_note(rep: Report, an: GainAnalysis) -> str:
    lo, hi = an.frontier.range if an.frontier.usable else (float("nan"), float("nan"))
    return (f"Equal-utility privacy gain over `{an.reference}`: log(MSE / MSE_ref(accuracy)) on the "
            f"{'worst-case' if rep.attack in (None, WORST) else rep.attack} MSE; > 0 = more private than "
            f"{an.reference} at the same accuracy. Frontier: monotone fit over {len(an.reference_levels)} settings "
            f"averaged over seeds, accuracy range [{lo:.4f}, {hi:.4f}], never extrapolated. {an.interval_note}.")


def render_markdown(rep: Report, files_dir: str = "report_files") -> str:
    out = [f"# {md_escape(rep.title)}", "", f"{len(rep.runs)} finished runs in {sum(len(s.groups) for s in rep.sections)} "
           f"groups; mean ± sample std over seeds (n = seeds per group). Privacy axis: "
           f"{'worst case over the attack suite (worst attack named per row)' if rep.attack == WORST else rep.attack}.", ""]
    for sec in rep.sections:
        g0 = sec.groups[0]
        out += [f"## {md_escape(sec.dataset)}", "", f"model {md_escape(g0.model)}, cut {md_escape(g0.cut)}", ""]
        hdr = _header(sec)
        out += [_md_row(hdr), "|" + "|".join("---" for _ in hdr) + "|"]
        out += [_md_row(_cells(sec, g)) for g in sec.groups]
        out.append("")
        out += [md_escape(line) + "  " for line in _fixed_lines(sec)] + [""]
        out += [md_escape(line) for line in _exclusion_lines(sec)] + ([""] if _exclusion_lines(sec) else [])
        if sec.pareto:
            out += [f"Pareto front (accuracy vs {rep.attack} MSE): " + ", ".join(md_escape(p) for p in sec.pareto), ""]
        for an in sec.analyses:
            out += [f"### Equal-utility gain over {md_escape(an.reference)}", "", _gain_note(rep, an), ""]
            out += [_md_row(GAIN_HEADER), "|" + "|".join("---" for _ in GAIN_HEADER) + "|"]
            out += [_md_row(fmt_gain_cells(a, g, gain, sec)) for a, g, gain in gain_rows(sec) if a is an]
            out.append("")
        for f in sec.figures:
            pdf = f" ([PDF]({files_dir}/{Path(f.name).with_suffix('.pdf').name}))" if f.pdf else ""
            out += [f"![{md_escape(f.title)}]({files_dir}/{f.name}){pdf}", ""]
    out += ["## All runs", "", to_markdown(default_view(rep.records), DEFAULT_COLUMNS) if rep.records else "(none)",
            "", "Every column of every run: report.csv (`--format csv`)."]
    return "\n".join(out)


def render_gains_csv(rep: Report) -> str:
    """One row per (reference, group) with full-precision gain, interval and controls."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["dataset", "model", "cut", "reference", "defense", "label", "n", "accuracy", "mse", "where", "gain",
                "ci_low", "ci_high", "ci_kept", "ci_method", "n_boot", "flags"] + list(CONTROLS) + ["run_ids",
                "ci_se", "ci_df", "segment_width", "wide_segment"])
    for sec in rep.sections:
        for an, g, gain in gain_rows(sec):
            ctrl = [g.stat(c)[0] for c in CONTROLS]
            w.writerow([g.dataset, g.model, g.cut, an.reference, g.defense, g.label, gain.n, repr(gain.accuracy),
                        repr(gain.mse), gain.where, "" if gain.gain is None else repr(gain.gain),
                        "" if gain.ci is None else repr(gain.ci[0]), "" if gain.ci is None else repr(gain.ci[1]),
                        "" if gain.ci_kept is None else repr(gain.ci_kept), gain.ci_method, an.n_boot,
                        flag_text(g.flags)] + ["" if v is None else repr(v) for v in ctrl]
                       + [" ".join(r.run_id for r in g.runs)]
                       + ["" if gain.se is None else repr(gain.se), "" if gain.df is None else repr(gain.df),
                          "" if gain.bridge is None else repr(gain.bridge), "yes" if gain.wide else ""])
    return buf.getvalue()


def render_summary_csv(rep: Report) -> str:
    params: list[str] = []
    metrics: list[str] = []
    for sec in rep.sections:
        params += [p for p in sec.params if p not in params]
        metrics += [m for m in rep.csv_metrics + sec.metrics + sec.controls if m not in metrics]
    cols = ["dataset", "model", "cut", "defense"] + params + ["n", "seeds"] + \
        [f"{m}_{s}" for m in metrics for s in ("mean", "std")] + ["worst_attacks", "flags", "run_ids"]
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
            row += [" ".join(g.worst_attacks("mse")), flag_text(g.flags), " ".join(r.run_id for r in g.runs)]
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
                "\\begin{tabular}{" + "l" * (len(hdr) - len(sec.metrics) - len(sec.controls) - 2 - _worst_col(sec)) + "r"
                + "c" * len(sec.metrics) + "l" * _worst_col(sec) + "c" * len(sec.controls) + "l}",
                "\\toprule",
                " & ".join(tex_escape(h) for h in hdr) + " \\\\", "\\midrule"]
        for g in sec.groups:
            cells = [tex_escape(c) for c in _param_cells(sec, g) + [str(g.n)]]
            for m in sec.metrics:
                mean, std = g.stat(m)
                d = _metric_digits(m)
                cells.append("" if mean is None else (f"${mean:.{d}f}$" if std is None else f"${mean:.{d}f} \\pm {std:.{d}f}$"))
            tail = ([", ".join(g.worst_attacks("mse"))] if _worst_col(sec) else []) + \
                [fmt_stat(*g.stat(c), c) for c in sec.controls] + [flag_text(g.flags)]
            cells += [tex_escape(c) for c in tail]
            out.append(" & ".join(cells) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}", "",
                "\\par\\footnotesize " + tex_escape("; ".join(_fixed_lines(sec) + _exclusion_lines(sec))), "\\end{table}", ""]
        rows = gain_rows(sec)
        if rows:
            out += ["\\begin{table}[t]", "\\centering", "\\small",
                    f"\\caption{{{tex_escape(sec.dataset)}: equal-utility privacy gain log(MSE/MSE$_\\mathrm{{ref}}$(accuracy)) "
                    f"with 95\\% {'bootstrap' if rep.sections and any(a.method == 'bootstrap' for sec_ in rep.sections for a in sec_.analyses) else 't'} intervals; n/a: outside the reference's accuracy range (not extrapolated).}}",
                    f"\\label{{tab:{_slug(sec.dataset)}-gain}}",
                    "\\begin{tabular}{" + "l" * 3 + "r" * (len(GAIN_HEADER) - 3) + "}", "\\toprule",
                    " & ".join(tex_escape(h) for h in GAIN_HEADER) + " \\\\", "\\midrule"]
            out += [" & ".join(tex_escape(c) for c in fmt_gain_cells(an, g, gain, sec)) + " \\\\" for an, g, gain in rows]
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
            f"(n = seeds per group). Privacy axis: {e('worst case over the attack suite' if rep.attack == WORST else str(rep.attack))}. Rows on the Pareto front are shaded. "
            f"Generated {e(time.strftime('%Y-%m-%d %H:%M'))}.</p>"]
    for sec in rep.sections:
        g0 = sec.groups[0]
        body.append(f'<section class="dataset" id="{e(_slug(sec.dataset))}"><h2>{e(sec.dataset)}</h2>')
        body.append(f'<p class="note">model {e(g0.model)}, cut {e(g0.cut)}</p>')
        classes = ["pareto" if g.label in sec.pareto else "" for g in sec.groups]
        body.append(_html_table(_header(sec), [_cells(sec, g) for g in sec.groups], classes, "summary"))
        body += [f'<p class="note">{e(line)}</p>' for line in _fixed_lines(sec) + _exclusion_lines(sec)]
        for an in sec.analyses:
            body.append(f"<h3>Equal-utility gain over {e(an.reference)}</h3>")
            body.append(f'<p class="note">{e(_gain_note(rep, an).replace("`", ""))}</p>')
            body.append(_html_table(GAIN_HEADER, [fmt_gain_cells(a, g, gain, sec) for a, g, gain in gain_rows(sec)
                                                  if a is an], cls="gains"))
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
                 attack: str | None = None, references: list[str] | None = None, n_boot: int = 2000,
                 seed: int = 0, interval: str = "t") -> dict[str, Path]:
    """Write the requested formats (md, csv, latex, html) into ``out`` (default: beside the store).

    md -> report.md (+ figures in report_files/), csv -> report.csv (one row per run) and summary.csv (one
    row per group) and gains.csv (one row per equal-utility gain), latex -> report.tex, html -> report.html
    (self-contained). Trade-off and cost figures are written as 300-dpi PNG and PDF. Returns name -> path."""
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ValueError(f"unknown report format '{bad[0]}'; valid: {', '.join(FORMATS)}")
    folder = Path(out) if out else results_paths(results)[0]
    folder.mkdir(parents=True, exist_ok=True)
    rep = build(results, attack, figures=("md" in formats or "html" in formats), references=references, n_boot=n_boot,
                seed=seed, interval=interval)
    written: dict[str, Path] = {}
    if "md" in formats:
        files = folder / "report_files"
        files.mkdir(exist_ok=True)
        for sec in rep.sections:
            for f in sec.figures:
                (files / f.name).write_bytes(f.png)
                written[f.name] = files / f.name
                if f.pdf:
                    pdf = files / Path(f.name).with_suffix(".pdf").name
                    pdf.write_bytes(f.pdf)
                    written[pdf.name] = pdf
        written["md"] = folder / "report.md"
        written["md"].write_text(render_markdown(rep))
    if "csv" in formats:
        written["csv"] = folder / "report.csv"
        written["csv"].write_text(to_csv(rep.records, columns(rep.records)) if rep.records else "")
        written["summary_csv"] = folder / "summary.csv"
        written["summary_csv"].write_text(render_summary_csv(rep))
        written["gains_csv"] = folder / "gains.csv"
        written["gains_csv"].write_text(render_gains_csv(rep))
    if "latex" in formats:
        written["latex"] = folder / "report.tex"
        written["latex"].write_text(render_latex(rep))
    if "html" in formats:
        written["html"] = folder / "report.html"
        written["html"].write_text(render_html(rep))
    return written
