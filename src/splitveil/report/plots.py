"""Report figures: accuracy-vs-MSE trade-off with the Pareto front, ablations of swept parameters, and
reconstruction grids side by side per defense, privacy vs edge cost. ``*_figure`` return a matplotlib figure
(``render`` gives 300-dpi PNG and PDF bytes), ``*_plot`` PNG bytes (None if nothing to plot)."""
from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

from .aggregate import Group, pareto_front
from .figures import image_grid, pyplot as _plt


MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p", "d", "8"]
DPI = 300
# sizes for a figure printed at one column (~3.5 in): 8 pt text, 7 pt legend
STYLE = {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
         "legend.fontsize": 6.5}


def _png(fig, dpi: int = DPI) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def render(fig, dpi: int = DPI) -> tuple[bytes, bytes]:
    """(PNG at ``dpi``, vector PDF) of a figure; closes it."""
    out = []
    for fmt in ("png", "pdf"):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=dpi, bbox_inches="tight")
        out.append(buf.getvalue())
    _plt().close(fig)
    return out[0], out[1]


def metric_label(attack: str, metric: str = "mse") -> str:
    name = metric.upper()
    return f"worst-case {name} over attacks" if attack == "worst" else f"{attack} {name}"


def styles(groups: list[Group]) -> tuple[dict[str, Any], dict[int, str]]:
    """Colour per defense and a marker per parameter value within each defense (never colour alone)."""
    plt = _plt()
    defenses = sorted({g.defense for g in groups})
    cmap = plt.get_cmap("tab20" if len(defenses) > 10 else "tab10")
    color = {d: cmap(k % cmap.N) for k, d in enumerate(defenses)}
    marker: dict[int, str] = {}
    for d in defenses:
        for k, g in enumerate(g for g in groups if g.defense == d):
            marker[id(g)] = MARKERS[k % len(MARKERS)]
    return color, marker


def _plain_log_ticks(axis) -> None:
    """Log axis with plain numbers on the major ticks and no labels on the minor ones (no overlapping 10^x)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _legend_below(fig, ax, n: int) -> None:
    ncol = 2 if n > 4 else 1
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=ncol, frameon=False, handletextpad=0.3,
              columnspacing=0.8)


def tradeoff_figure(groups: list[Group], attack: str, title: str = "", analyses: list | None = None,
                    baseline_mse: float | None = None, undefended_acc: float | None = None):
    """Accuracy (y) against the privacy MSE (x, log scale; higher = more private), one point per group with
    error bars (sample std over seeds), colour per defense and a marker per parameter value; each reference
    frontier (``analyses``: equal_utility.GainAnalysis) as a line with its bootstrap band; the mean-image
    baseline (vertical) and the undefended accuracy (horizontal) as reference lines; the Pareto front
    ringed; beside every point scored against the first reference, its gain log(MSE / MSE_ref(accuracy)).
    Returns (figure or None, indices of the front groups)."""
    pts, used = [], []
    for i, g in enumerate(groups):
        acc, mse = g.stat("accuracy"), g.stat(f"{attack}.mse")
        if acc[0] is not None and mse[0] is not None:
            pts.append((mse[0], acc[0], mse[1] or 0.0, acc[1] or 0.0))
            used.append(i)
    if not pts:
        return None, []
    front = [used[k] for k in pareto_front([(p[0], p[1]) for p in pts])]
    plt = _plt()
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(3.6, 2.8))
        color, marker = styles([groups[i] for i in used])
        for k, i in enumerate(used):
            g = groups[i]
            x, y, xe, ye = pts[k]
            ax.errorbar(x, y, xerr=xe, yerr=ye, fmt=marker[id(g)], color=color[g.defense], ms=4.5, capsize=1.5,
                        lw=0.7, mec="black", mew=0.4, label=g.label, zorder=4)
        for an in analyses or []:
            f = an.frontier
            if not f.usable:
                continue
            ax.plot(np.exp(f.log_mse), f.acc, "-", color="0.25", lw=1.1, zorder=2,
                    label=f"{an.reference} frontier (monotone fit)")
            if len(an.band_acc) and np.isfinite(an.band_lo).any():
                ok = np.isfinite(an.band_lo) & np.isfinite(an.band_hi)
                ax.fill_betweenx(an.band_acc[ok], np.exp(an.band_lo[ok]), np.exp(an.band_hi[ok]), color="0.6",
                                 alpha=0.3, lw=0, zorder=1, label="95% bootstrap band")
        # the equal-utility gain over the first reference, written beside each point it applies to
        first = next((an for an in analyses or [] if an.frontier.usable), None)
        if first is not None:
            for k, i in enumerate(used):
                g = groups[i]
                gain = first.for_key(id(g))
                if gain is not None and gain.gain is not None and g.defense != first.reference:
                    ax.annotate(f"{gain.gain:+.2f}", (pts[k][0], pts[k][1]), textcoords="offset points", xytext=(4, -9),
                                fontsize=6.5, color=color[g.defense])
        if baseline_mse is not None:
            ax.axvline(baseline_mse, color="tab:red", ls=":", lw=1, label="mean-image baseline MSE", zorder=1)
        if undefended_acc is not None:
            ax.axhline(undefended_acc, color="tab:blue", ls="--", lw=0.8, label="undefended accuracy", zorder=1)
        fx = [pts[used.index(i)][0] for i in front]
        fy = [pts[used.index(i)][1] for i in front]
        ax.scatter(fx, fy, s=90, facecolors="none", edgecolors="black", lw=0.8, label="Pareto front", zorder=5)
        ax.set_xscale("log")
        _plain_log_ticks(ax.xaxis)
        ax.set_xlabel(f"{metric_label(attack)} (higher = more private)")
        ax.set_ylabel("test accuracy")
        ax.set_title(title or "accuracy vs reconstruction MSE")
        ax.grid(alpha=0.3, which="both", lw=0.4)
        _legend_below(fig, ax, len(used))
    return fig, front


def tradeoff_plot(groups: list[Group], attack: str, title: str = "", **kw) -> tuple[bytes | None, list[int]]:
    """``tradeoff_figure`` as 300-dpi PNG bytes: (png, indices of the Pareto-front groups)."""
    fig, front = tradeoff_figure(groups, attack, title, **kw)
    return (_png(fig) if fig is not None else None), front


def cost_figure(groups: list[Group], attack: str, title: str = ""):
    """Privacy against edge cost for deployment reviews: worst-case (or ``attack``) MSE (y) against encoder
    FLOPs per image (x; latency per image when FLOPs were not recorded), one point per group with error bars
    over seeds. None when no group has a cost."""
    cost_key = "encoder_flops" if any(g.stat("encoder_flops")[0] for g in groups) else "latency_ms"
    rows = [(g, g.stat(cost_key), g.stat(f"{attack}.mse")) for g in groups]
    rows = [r for r in rows if r[1][0] is not None and r[2][0] is not None]
    if not rows:
        return None
    plt = _plt()
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(3.6, 2.8))
        color, marker = styles([r[0] for r in rows])
        for g, c, m in rows:
            ax.errorbar(c[0], m[0], xerr=c[1] or 0.0, yerr=m[1] or 0.0, fmt=marker[id(g)], color=color[g.defense],
                        ms=4.5, capsize=1.5, lw=0.7, mec="black", mew=0.4, label=g.label)
        ax.set_xlabel("encoder FLOPs per image" if cost_key == "encoder_flops" else "encoder latency per image (ms)")
        ax.set_ylabel(metric_label(attack))
        xs = [r[1][0] for r in rows]
        if min(xs) > 0 and max(xs) / min(xs) >= 20:
            ax.set_xscale("log")
        ax.set_title(title or "privacy vs edge cost")
        ax.grid(alpha=0.3, lw=0.4)
        _legend_below(fig, ax, len(rows))
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


def ablation_plot(groups: list[Group], fieldname: str, attack: str, title: str = "") -> bytes | None:
    """Accuracy and attack MSE against one swept parameter; one line per combination of everything else."""
    lines: dict[str, list[tuple[float, Group]]] = {}
    for g in groups:
        v = g.params.get(fieldname)
        if not _numeric(v):
            continue
        rest = " ".join([g.defense] + [f"{k.split('.')[-1]}={v2}" for k, v2 in g.params.items() if k != fieldname])
        lines.setdefault(rest, []).append((float(v), g))
    if not lines:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label, items in sorted(lines.items()):
        items.sort(key=lambda t: t[0])
        xs = [t[0] for t in items]
        for ax, metric in zip(axes, ("accuracy", f"{attack}.mse")):
            st = [t[1].stat(metric) for t in items]
            if any(m is None for m, _ in st):
                continue
            ax.errorbar(xs, [m for m, _ in st], yerr=[s or 0.0 for _, s in st], marker="o", ms=4, capsize=2,
                        lw=1, label=label)
    for ax, name in zip(axes, ("test accuracy", metric_label(attack))):
        ax.set_xlabel(fieldname)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        vals = sorted({float(g.params[fieldname]) for g in groups if _numeric(g.params.get(fieldname))})
        if vals[0] > 0 and vals[-1] / vals[0] >= 50:
            ax.set_xscale("log")
    axes[0].legend(fontsize=6, loc="best")
    fig.suptitle(title or f"ablation: {fieldname}", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def recon_comparison(groups: list[Group], attack: str, max_rows: int = 16, max_images: int = 8,
                     title: str = "") -> bytes | None:
    """The same test images (top row) and their reconstructions under each group's defense (one row per
    group; the run with the lowest seed), read from the runs' ``recon_<attack>.pt``."""
    rows: list[tuple[str, torch.Tensor]] = []
    originals = None
    for g in groups:
        run = min(g.runs, key=lambda r: r.seed)
        f = run.run_dir / f"recon_{attack}.pt" if run.run_dir else None
        if f is None or not f.exists():
            continue
        d = torch.load(f, weights_only=True)
        if originals is None:
            originals = d["originals"][:max_images]
        rows.append((g.label, d["recon"][:max_images]))
        if len(rows) >= max_rows:
            break
    if originals is None:
        return None
    all_rows = [("original", originals)] + rows
    n = min(len(originals), min(r.shape[0] for _, r in all_rows))
    fig = image_grid(all_rows, n, cell=(1.1, 1.15), label_size=7)
    fig.suptitle(title or f"{attack} reconstructions per defense", fontsize=9)
    fig.tight_layout()
    return _png(fig)
