"""Figures of the GPZ sweep: MSE and R_c^2 against depth with the transition zone shaded, label-form overlays,
and a reconstruction strip (one row per cut)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .figures import finish_figure, pyplot as _plt


def _shade(ax, rows: list[dict[str, Any]], zone: dict[str, Any], color: str = "tab:orange", alpha: float = 0.2,
           label: bool = True) -> None:
    """Shade each zone cut (paper's rule: the cut after the largest R_c^2 drop, plus a second zone cut)."""
    if zone.get("found"):
        for i, k in enumerate(zone["zone_cuts"]):
            ax.axvspan(k - 0.5, k + 0.5, color=color, alpha=alpha,
                       label="transition zone (paper's rule)" if label and i == 0 else None)


def _threshold(zone: dict[str, Any]) -> tuple[float, str]:
    f = zone.get("fidelity")
    if f:
        return f["threshold_per_element"], f"paper's 0.02 / {f['channels']} channels"
    return 0.02 / 3, "paper's 0.02 / 3 channels"


def _xticks(ax, rows: list[dict[str, Any]]) -> None:
    ax.set_xticks([r["cut"] for r in rows])
    ax.set_xticklabels([f"{r['cut']}\n{r['block']}" for r in rows], fontsize=7, rotation=0 if len(rows) <= 10 else 60)
    ax.set_xlabel("cut (blocks on the edge)")


def plot_sweep(rows: list[dict[str, Any]], zone: dict[str, Any], path: str | Path, title: str = "") -> None:
    """Top: attack MSE per cut with the paper's high-fidelity threshold per element (if the sweep ran attacks);
    bottom: R_c^2 (class mean, error bars = bootstrap 95% interval, else spread over classes; log scale) and the
    within-class fraction on a second axis. Zone shaded."""
    plt = _plt()
    attack = any(r.get("mse") is not None for r in rows)
    n = 2 if attack else 1
    fig, axes = plt.subplots(n, 1, figsize=(max(6.0, 0.6 * len(rows) + 3), 3.2 * n), sharex=True, squeeze=False)
    x = [r["cut"] for r in rows]
    if attack:
        ax = axes[0][0]
        _shade(ax, rows, zone)
        ax.errorbar(x, [r.get("mse") for r in rows], yerr=[r.get("mse_std", 0.0) for r in rows], marker="o",
                    capsize=2, label="inverse-network MSE")
        thr, what = _threshold(zone)
        ax.axhline(thr, ls="--", color="gray", lw=1, label=f"MSE {thr:.4g} ({what})")
        ax.set_ylabel("attack MSE")
        ax.legend(fontsize=7)
    ax = axes[-1][0]
    _shade(ax, rows, zone)
    rc = [max(r["rc2_mean"], 1e-12) for r in rows]
    if all(r.get("rc2_ci95") for r in rows):
        yerr = [[max(0.0, v - r["rc2_ci95"][0]) for r, v in zip(rows, rc)],
                [max(0.0, r["rc2_ci95"][1] - v) for r, v in zip(rows, rc)]]
        what = "bootstrap 95% interval"
    else:
        yerr = [min(r["rc2_std"], 0.999 * v) for r, v in zip(rows, rc)]
        what = "std over classes"
    ax.errorbar(x, rc, yerr=yerr, marker="s", capsize=2, color="tab:green", label=f"R_c^2 (class mean; bars: {what})")
    ax.set_yscale("log")
    ax.set_ylabel("R_c^2")
    ax2 = ax.twinx()
    ax2.plot(x, [r["within_fraction"] for r in rows], marker="^", color="tab:purple", label="within-class fraction")
    ax2.set_ylabel("mean R_c^2 / tr(Sigma)")
    ax2.set_ylim(bottom=0)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7)
    _xticks(ax, rows)
    finish_figure(fig, path, title)


def plot_compare(sweeps: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]], path: str | Path, title: str = "") -> None:
    """Overlay of several sweeps (e.g. label forms): MSE (if any), R_c^2 and within-class fraction per cut."""
    plt = _plt()
    attack = any(r.get("mse") is not None for rows, _ in sweeps.values() for r in rows)
    panels = ["rc2_mean", "within_fraction"] + (["mse"] if attack else [])
    labels = {"rc2_mean": "R_c^2 (mean)", "within_fraction": "within-class fraction", "mse": "attack MSE"}
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.8 * len(panels)), sharex=True, squeeze=False)
    for i, key in enumerate(panels):
        ax = axes[i][0]
        for name, (rows, zone) in sweeps.items():
            line, = ax.plot([r["cut"] for r in rows], [r.get(key) for r in rows], marker="o", label=name)
            _shade(ax, rows, zone, color=line.get_color(), alpha=0.1, label=False)
        if key == "rc2_mean":
            ax.set_yscale("log")
        if key == "mse":
            ax.axhline(_threshold(next(iter(sweeps.values()))[1])[0], ls="--", color="gray", lw=1)
        ax.set_ylabel(labels[key])
        ax.legend(fontsize=7)
    _xticks(axes[-1][0], next(iter(sweeps.values()))[0])
    finish_figure(fig, path, title)


def save_recon_strip(path: str | Path, strips: dict[str, dict[str, torch.Tensor]], title: str = "") -> None:
    """Originals on top, then one row of reconstructions per cut (``strips``: label -> {originals, recon})."""
    from .figures import save_recon_grid

    first = next(iter(strips.values()))
    n = min(int(s["recon"].shape[0]) for s in strips.values())
    save_recon_grid(path, first["originals"][:n], {k: s["recon"][:n] for k, s in strips.items()}, title)
