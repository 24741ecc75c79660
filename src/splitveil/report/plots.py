"""Report figures: accuracy-vs-MSE trade-off with the Pareto front, ablations of swept parameters, and
reconstruction grids side by side per defense. Every function returns PNG bytes (None if nothing to plot)."""
from __future__ import annotations

import io
from typing import Any

import torch

from .aggregate import Group, pareto_front


from .figures import image_grid, pyplot as _plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _plt().close(fig)
    return buf.getvalue()


def tradeoff_plot(groups: list[Group], attack: str, title: str = "") -> tuple[bytes | None, list[int]]:
    """Accuracy (y) against the attack's MSE (x, higher = more private), mean +- std over seeds per group;
    the Pareto front (not dominated in both) ringed and joined. Returns (png, indices of front groups)."""
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
    fig, ax = plt.subplots(figsize=(7.5, 5))
    defenses = sorted({groups[i].defense for i in used})
    cmap = plt.get_cmap("tab20" if len(defenses) > 10 else "tab10")
    color = {d: cmap(k % cmap.N) for k, d in enumerate(defenses)}
    shown = set()
    for k, i in enumerate(used):
        g = groups[i]
        x, y, xe, ye = pts[k]
        ax.errorbar(x, y, xerr=xe, yerr=ye, fmt="o", color=color[g.defense], ms=6, capsize=2, lw=0.8,
                    label=g.defense if g.defense not in shown else None)
        shown.add(g.defense)
        ax.annotate(g.label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=6, alpha=0.8)
    fx = [pts[used.index(i)][0] for i in front]
    fy = [pts[used.index(i)][1] for i in front]
    ax.plot(fx, fy, "--", color="black", lw=1, zorder=0)
    ax.scatter(fx, fy, s=160, facecolors="none", edgecolors="black", lw=1.2, label="Pareto front", zorder=3)
    ax.set_xlabel(f"{attack} MSE (higher = more private)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title or "accuracy vs reconstruction MSE", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _png(fig), front


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
    for ax, name in zip(axes, ("test accuracy", f"{attack} MSE")):
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
