"""Report figures: accuracy-vs-MSE trade-off with the Pareto front, privacy vs edge cost, ablations of swept
parameters, and reconstruction grids side by side per defense. Every figure follows the project's one standard
(``results/figures.py``: column-width style, a colour and marker per series that never repeat, 300-dpi PNG plus
PDF). ``*_figure`` return a matplotlib figure (``render`` gives PNG and PDF bytes); ``*_plot`` / ``recon_comparison``
PNG bytes (None if nothing to plot)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..results.figures import (COLUMN_WIDTH, DPI, MARKERS, family_colors, family_styles, image_grid, log_ticks,
                               place_labels, pyplot as _plt, render as _render, score_note, series_styles, style)
from .aggregate import Group, pareto_front
from .results import _fmt

__all__ = ["MARKERS", "DPI", "render", "tradeoff_figure", "tradeoff_plot", "cost_figure", "ablation_fields",
           "ablation_figure", "ablation_plot", "recon_figure", "recon_comparison", "param_text"]

# short names of common parameters in annotations and labels
SYMBOLS = {"sigma": "σ", "lambda": "λ", "lambda_": "λ", "alpha": "α", "slots": "S"}
MAX_RECON_ROWS = 16


def render(fig, dpi: int = DPI) -> tuple[bytes, bytes]:
    """(PNG at ``dpi``, vector PDF) of a figure; closes it."""
    out = _render(fig, ("png", "pdf"), dpi)
    return out["png"], out["pdf"]


def _png(fig, dpi: int = DPI) -> bytes:
    return _render(fig, ("png",), dpi)["png"]


def metric_label(attack: str, metric: str = "mse") -> str:
    name = metric.upper()
    return f"worst-case {name} over attacks" if attack == "worst" else f"{attack} {name}"


def _short(key: str) -> str:
    name = key.split(".")[-1]
    return SYMBOLS.get(name, name)


def param_text(g: Group, keys: list[str]) -> str:
    """``σ=0.1 λ=4``: the given parameters of ``g`` that are set (a parameter a defense does not have is left
    out, never shown as None)."""
    return " ".join(f"{_short(k)}={_fmt(g.params[k])}" for k in keys if g.params.get(k) is not None)


def _varying_within(groups: list[Group], defense: str) -> list[str]:
    """The parameters that differ between the groups of one defense."""
    gs = [g for g in groups if g.defense == defense]
    keys = list(dict.fromkeys(k for g in gs for k in g.params))
    return [k for k in keys if len({repr(g.params.get(k)) for g in gs}) > 1]


def _number_sort(v: Any):
    return (0, float(v), "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0.0, repr(v))


def _group_styles(groups: list[Group]) -> tuple[dict[str, Any], dict[int, tuple[Any, str]], dict[int, str]]:
    """Colour per defense, (colour, marker) per group (a marker per setting within its defense, in numeric order
    of its parameters) and each group's setting text."""
    defenses = list(dict.fromkeys(g.defense for g in groups))
    text, pairs = {}, []
    for d in defenses:
        keys = _varying_within(groups, d)
        members = sorted((g for g in groups if g.defense == d), key=lambda g: [_number_sort(g.params.get(k)) for k in keys])
        for g in members:
            text[id(g)] = param_text(g, keys)
            pairs.append((d, id(g)))
    st = family_styles(pairs)
    return family_colors(defenses), {gid: st[(d, gid)] for d, gid in pairs}, text


def _defense_key(fig, colors: dict[str, Any], extra: list[tuple[Any, str]], title: str | None = None, ncols: int | None = None):
    """A compact key outside the axes, above them: one entry per defense (its colour) plus the reference lines."""
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=c, edgecolor="black", lw=0.4) for c in colors.values()] + [h for h, _ in extra]
    labels = list(colors) + [lab for _, lab in extra]
    if ncols is None:
        ncols = 2 if max((len(x) for x in labels), default=0) <= 24 else 1
    return fig.legend(handles, labels, loc="outside upper center", ncols=ncols, frameon=False, handlelength=1.6,
                      handletextpad=0.4, columnspacing=1.0, borderaxespad=0.2, title=title)


def _height(n_entries: int, ncols: int, axes_in: float = 2.5) -> float:
    return axes_in + 0.35 + 0.16 * -(-n_entries // ncols)


def tradeoff_figure(groups: list[Group], attack: str, title: str = "", analyses: list | None = None,
                    baseline_mse: float | None = None, undefended_acc: float | None = None):
    """Accuracy (y, at most 1) against the privacy MSE (x, log scale; higher = more private), one point per group
    with error bars (sample std over seeds); a colour per defense (the key above the axes) and a marker per
    setting, whose parameter values are written beside the point with, for the points scored against the first
    reference, the equal-utility gain (``λ=4 +0.30``; labels placed so that they overlap neither each other nor a
    marker). Each reference frontier (``analyses``: equal_utility.GainAnalysis) is drawn in its defense's colour
    with its own band; the mean-image baseline (vertical) and the undefended accuracy (horizontal) as reference
    lines; the Pareto front ringed. One column wide (3.6 in). Returns (figure or None, indices of the front
    groups)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    pts, used, out_pts = [], [], []
    for i, g in enumerate(groups):
        kept = g.kept()   # runs flagged chance accuracy, unconverged, ... enter no front: drawn apart, greyed
        acc, mse = (kept or g).stat("accuracy"), (kept or g).stat(f"{attack}.mse")
        if acc[0] is not None and mse[0] is not None:
            if kept is None:
                out_pts.append((mse[0], acc[0]))
            else:
                pts.append((mse[0], acc[0], mse[1] or 0.0, acc[1] or 0.0))
                used.append(i)
    if not pts:
        return None, []
    front = [used[k] for k in pareto_front([(p[0], p[1]) for p in pts])]
    ug = [groups[i] for i in used]
    colors, style_of, text = _group_styles(ug)
    plt = _plt()
    analyses = [an for an in analyses or [] if an.frontier.usable]
    extra: list[tuple[Any, str]] = []
    if analyses:
        an0 = analyses[0]
        level, method = getattr(an0, "level", 0.95), getattr(an0, "method", "bootstrap")
        extra.append(((Line2D([], [], color="0.2", lw=1.1), Patch(color="0.6", alpha=0.35, lw=0)),
                      f"reference frontier, {level:.0%} {'bootstrap' if method == 'bootstrap' else 't'} band"))
    extra.append((Line2D([], [], ls="none", marker="o", ms=7, mfc="none", mec="black", mew=0.8), "Pareto front"))
    if out_pts:
        extra.append((Line2D([], [], ls="none", marker="x", ms=5, color="0.55"), "excluded (flagged; see table)"))
    if baseline_mse is not None:
        extra.append((Line2D([], [], color="tab:red", ls=":", lw=1), "mean-image baseline MSE"))
    if undefended_acc is not None:
        extra.append((Line2D([], [], color="tab:blue", ls="--", lw=0.8), "undefended accuracy"))
    n_entries = len(colors) + len(extra)
    ncols = 2 if max(len(x) for x in list(colors) + [lab for _, lab in extra]) <= 24 else 1
    with style():
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, _height(n_entries, ncols, 2.7)), layout="constrained")
        for k, g in enumerate(ug):
            x, y, xe, ye = pts[k]
            c, m = style_of[id(g)]
            ax.errorbar(x, y, xerr=xe, yerr=ye, fmt=m, color=c, ms=4.5, capsize=1.5, lw=0.7, mec="black", mew=0.4,
                        label=g.label, zorder=4)
        for an in analyses:
            c = colors.get(an.reference, "0.25")
            f = an.frontier
            ax.plot(np.exp(f.log_mse), f.acc, "-", color=c, lw=1.1, zorder=2, label=f"{an.reference} frontier (monotone fit)")
            if len(an.band_acc) and np.isfinite(an.band_lo).any():
                ok = np.isfinite(an.band_lo) & np.isfinite(an.band_hi)
                level, method = getattr(an, "level", 0.95), getattr(an, "method", "bootstrap")
                ax.fill_betweenx(an.band_acc[ok], np.exp(np.clip(an.band_lo[ok], -50, 50)), np.exp(np.clip(an.band_hi[ok], -50, 50)), color=c, alpha=0.15,
                                 lw=0, zorder=1, label=f"{an.reference} {level:.0%} {'bootstrap' if method == 'bootstrap' else 't'} band")
        if baseline_mse is not None:
            ax.axvline(baseline_mse, color="tab:red", ls=":", lw=1, label="mean-image baseline MSE", zorder=1)
        if undefended_acc is not None:
            ax.axhline(undefended_acc, color="tab:blue", ls="--", lw=0.8, label="undefended accuracy", zorder=1)
        fx = [pts[used.index(i)][0] for i in front]
        fy = [pts[used.index(i)][1] for i in front]
        ax.scatter(fx, fy, s=70, facecolors="none", edgecolors="black", lw=0.8, label="Pareto front", zorder=5)
        if out_pts:
            ax.scatter([p[0] for p in out_pts], [p[1] for p in out_pts], marker="x", s=22, color="0.55", lw=0.9,
                       label="excluded (flagged)", zorder=3)
        ax.set_xscale("log")
        xs = [p[0] for p in pts + out_pts] + ([baseline_mse] if baseline_mse else [])
        lo, hi = min(xs), max(xs)
        ax.set_xlim(lo / 1.15, hi * 1.15)
        ys = [p[1] + p[3] for p in pts] + [p[1] for p in out_pts] + ([undefended_acc] if undefended_acc is not None else [])
        ylo = min([p[1] - p[3] for p in pts] + [p[1] for p in out_pts])
        top = min(1.0, max(ys) + 0.04)
        ax.set_ylim(max(0.0, ylo - 0.04), top)
        log_ticks(ax.xaxis)
        ax.set_xlabel(f"{metric_label(attack)} (higher = more private)")
        ax.set_ylabel("test accuracy")
        ax.set_title(title or "accuracy vs reconstruction MSE")
        ax.grid(alpha=0.3, which="major", lw=0.4)
        _defense_key(fig, colors, extra, ncols=ncols)
        fig.canvas.draw()                       # the layout is final: labels are placed in display space
        first = analyses[0] if analyses else None
        labels, where, tcol = [], [], []
        for k, g in enumerate(ug):
            t = text[id(g)]
            if first is not None and g.defense != first.reference:
                gain = first.for_key(id(g))
                if gain is not None and gain.gain is not None:
                    t = f"{t} {gain.gain:+.2f}".strip()
            labels.append(t)
            where.append((pts[k][0], pts[k][1]))
            tcol.append(style_of[id(g)][0])
        for a in place_labels(ax, where, labels, [_darker(c) for c in tcol]):
            if a is not None:
                a.set_in_layout(False)
    return fig, front


def _darker(c) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    r, g, b = to_rgb(c)
    return (0.7 * r, 0.7 * g, 0.7 * b)


def tradeoff_plot(groups: list[Group], attack: str, title: str = "", **kw) -> tuple[bytes | None, list[int]]:
    """``tradeoff_figure`` as 300-dpi PNG bytes: (png, indices of the Pareto-front groups)."""
    fig, front = tradeoff_figure(groups, attack, title, **kw)
    return (_png(fig) if fig is not None else None), front


COST_AXES = (("encoder_flops", "encoder FLOPs per image", False), ("payload_bytes", "payload per image (bytes)", False),
             ("latency_ms", "encoder latency per image (ms)", True))


def cost_axis(groups: list[Group]) -> tuple[str, str] | None:
    """The edge cost that varies between the groups: FLOPs, else payload, else latency (only when FLOPs were not
    recorded: a latency difference at equal FLOPs is timing noise). None when nothing varies (e.g. CEM and noise
    add nothing at inference): the figure would be one vertical column."""
    flops_recorded = any(g.stat("encoder_flops")[0] for g in groups)
    for key, label, needs_no_flops in COST_AXES:
        if needs_no_flops and flops_recorded:
            continue
        vals = [g.stat(key)[0] for g in groups if g.stat(key)[0] is not None]
        if len(vals) >= 2 and max(vals) > 1.01 * min(vals):
            return key, label
    return None


def cost_figure(groups: list[Group], attack: str, title: str = ""):
    """Privacy against edge cost for deployment reviews: the privacy MSE (y) against the edge cost that varies
    (``cost_axis``), one point per group with error bars over seeds, colour per defense, marker per setting.
    None when no cost varies or none was recorded."""
    axis = cost_axis(groups)
    if axis is None:
        return None
    key, xlabel = axis
    rows = [(g, g.stat(key), g.stat(f"{attack}.mse")) for g in groups]
    rows = [r for r in rows if r[1][0] is not None and r[2][0] is not None]
    if len(rows) < 2:
        return None
    gs = [r[0] for r in rows]
    colors, style_of, _ = _group_styles(gs)
    plt = _plt()
    ncols = 2 if max(len(d) for d in colors) <= 24 else 1
    with style():
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, _height(len(colors), ncols, 2.5)), layout="constrained")
        for g, c, m in rows:
            col, mk = style_of[id(g)]
            ax.errorbar(c[0], m[0], xerr=c[1] or 0.0, yerr=m[1] or 0.0, fmt=mk, color=col, ms=4.5, capsize=1.5,
                        lw=0.7, mec="black", mew=0.4, label=g.label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric_label(attack))
        xs = [r[1][0] for r in rows]
        if min(xs) > 0 and max(xs) / min(xs) >= 20:
            ax.set_xscale("log")
            log_ticks(ax.xaxis)
        ax.set_title(title or "privacy vs edge cost")
        ax.grid(alpha=0.3, lw=0.4)
        _defense_key(fig, colors, [], title="colour: defense; marker: setting", ncols=ncols)
    return fig


def _numeric(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def ablation_fields(groups: list[Group]) -> list[str]:
    """Swept parameters with at least two numeric values among ``groups``."""
    fields = []
    for k in (groups[0].params if groups else {}):
        vals = {g.params.get(k) for g in groups if _numeric(g.params.get(k))}
        if len(vals) >= 2:
            fields.append(k)
    return fields


def ablation_figure(groups: list[Group], fieldname: str, attack: str, title: str = ""):
    """Accuracy (top) and the privacy MSE (bottom) against one swept parameter, in numeric order; one series per
    combination of the defense and the other parameters that vary (a distinct colour and marker each; a
    parameter a defense lacks is left out of its label); a one-point series is a marker, not a line. Error bars:
    sample std over seeds (stated in the figure). None when no group has a numeric value of the field."""
    lines: dict[tuple, list[tuple[float, Group]]] = {}
    for g in groups:
        v = g.params.get(fieldname)
        if _numeric(v):
            rest = tuple((k, repr(g.params.get(k))) for k in g.params if k != fieldname)
            lines.setdefault((g.defense,) + rest, []).append((float(v), g))
    if not lines:
        return None
    others = [k for k in (groups[0].params if groups else {}) if k != fieldname]
    members = [g for items in lines.values() for _, g in items]
    varying = [k for k in others if len({repr(g.params.get(k)) for g in members if g.params.get(k) is not None}) > 1]
    defenses = {key[0] for key in lines}

    def label(items) -> str:
        g = items[0][1]
        parts = [g.defense] if len(defenses) > 1 or not varying else []
        parts += [f"{_short(k)}={_fmt(g.params[k])}" for k in varying if g.params.get(k) is not None]
        return " ".join(parts) or g.defense

    ordered = sorted(lines.values(), key=lambda items: (items[0][1].defense,
                                                        [_number_sort(items[0][1].params.get(k)) for k in varying]))
    styles = series_styles(range(len(ordered)))
    ns = sorted({g.n for items in ordered for _, g in items})
    bars = ("error bars: ± 1 sample std over seeds (n = " + "/".join(map(str, ns)) + ")") if max(ns) > 1 \
        else "one seed per point: no error bars"
    vals = sorted({x for items in ordered for x, _ in items})
    plt = _plt()
    labels = [label(items) for items in ordered]
    ncols = 2 if max(len(x) for x in labels) <= 24 else 1
    with style():
        fig, axes = plt.subplots(2, 1, figsize=(COLUMN_WIDTH, 3.9 + 0.16 * -(-len(ordered) // ncols)), sharex=True,
                                 layout="constrained")
        for s, items in enumerate(ordered):
            items.sort(key=lambda t: t[0])
            xs = [t[0] for t in items]
            color, marker = styles[s]
            for ax, metric in zip(axes, ("accuracy", f"{attack}.mse")):
                st = [t[1].stat(metric) for t in items]
                keep = [(x, m, sd) for x, (m, sd) in zip(xs, st) if m is not None]
                if not keep:
                    continue
                ax.errorbar([k[0] for k in keep], [k[1] for k in keep], yerr=[k[2] or 0.0 for k in keep],
                            marker=marker, ms=4, capsize=1.5, lw=1, color=color, mec="black", mew=0.3,
                            ls="-" if len(keep) > 1 else "none", label=labels[s])
        for ax, name in zip(axes, ("test accuracy", metric_label(attack))):
            ax.set_ylabel(name)
            ax.grid(alpha=0.3, lw=0.4)
            if vals[0] > 0 and vals[-1] / vals[0] >= 50:
                ax.set_xscale("log")
        if axes[1].get_xscale() == "log":
            log_ticks(axes[1].xaxis)
        else:
            axes[1].set_xticks(vals if len(vals) <= 8 else axes[1].get_xticks())
        top = axes[0].get_ylim()
        axes[0].set_ylim(max(0.0, top[0]), min(1.0, top[1]))
        axes[1].set_xlabel(f"{_short(fieldname)} ({fieldname})" if _short(fieldname) != fieldname else fieldname)
        axes[0].set_title(title or f"ablation: {fieldname}")
        h, lab = axes[0].get_legend_handles_labels()
        fig.legend(h, lab, loc="outside lower center", ncols=ncols, frameon=False, title=bars, handletextpad=0.4,
                   columnspacing=1.0)
    return fig


def ablation_plot(groups: list[Group], fieldname: str, attack: str, title: str = "") -> bytes | None:
    """``ablation_figure`` as 300-dpi PNG bytes."""
    fig = ablation_figure(groups, fieldname, attack, title)
    return _png(fig) if fig is not None else None


def recon_figure(groups: list[Group], attack: str, max_rows: int = MAX_RECON_ROWS, max_images: int = 8,
                 title: str = ""):
    """The same test images (top row) and their reconstructions under each group's defense (one row per group,
    the undefended ``none`` first; the run with the lowest seed), read from the runs' ``recon_<attack>.pt``; each
    row carries that run's MSE / SSIM and its flags (weak, unconverged). At most ``max_rows`` groups: when there
    are more, the title says how many are shown. None when no run has reconstructions."""
    rows: list[tuple[str, torch.Tensor]] = []
    notes: list[str | None] = [None]
    originals = None
    ordered = sorted(groups, key=lambda g: g.defense != "none")
    available = []
    for g in ordered:
        run = min(g.runs, key=lambda r: r.seed)
        f = run.run_dir / f"recon_{attack}.pt" if run.run_dir else None
        if f is not None and f.exists():
            available.append((g, run, f))
    if not available:
        return None
    for g, run, f in available[:max_rows]:
        d = torch.load(f, weights_only=True)
        if originals is None:
            originals = d["originals"][:max_images]
        rows.append((g.label, d["recon"][:max_images]))
        rec = run.record
        notes.append(score_note(run.values.get(f"{attack}.mse"), run.values.get(f"{attack}.ssim"),
                                attack in rec.weak_attacks(), attack in rec.unconverged_attacks()))
    all_rows = [("original", originals)] + rows
    n = min(len(originals), min(r.shape[0] for _, r in all_rows))
    fig = image_grid(all_rows, n, notes=notes)
    head = title or f"{attack} reconstructions per defense"
    if len(available) > max_rows:
        head += f"\n(first {max_rows} of {len(available)} groups shown; every group's numbers are in the tables)"
    fig.suptitle(head, fontsize=8)
    return fig


def recon_comparison(groups: list[Group], attack: str, max_rows: int = MAX_RECON_ROWS, max_images: int = 8,
                     title: str = "") -> bytes | None:
    """``recon_figure`` as 300-dpi PNG bytes."""
    fig = recon_figure(groups, attack, max_rows, max_images, title)
    return _png(fig) if fig is not None else None
