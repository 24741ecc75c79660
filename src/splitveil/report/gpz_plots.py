"""Figures of the GPZ sweep: the MSE (as the fraction of the way to the mean-image baseline), R_c^2 with tr(Sigma),
and the scale-free within-class fraction on one figure with shared cuts, each rule's zone shaded; label-form
overlays; and a reconstruction strip (one row per cut). Every figure is saved as a 300-dpi PNG with a PDF beside it
(``save``)."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import torch

from .figures import image_grid, pyplot as _plt

DPI = 300
# each rule's zone: colour, hatch, legend label
ZONE_STYLE = {"raw": ("tab:orange", None, "zone: paper's rule on R_c^2"),
              "scale_free": ("tab:blue", "//", "zone: same rule, within-class fraction"),
              "mse": ("tab:red", "..", "zone by MSE (largest jump of MSE / baseline)")}


def _save_png_pdf(fig, path: str | Path, title: str = "") -> None:
    """``path`` as a 300-dpi PNG and the same figure as a PDF beside it (``<stem>.pdf``); closes the figure."""
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")          # "tight": a note placed under the axes is kept
    fig.savefig(path.with_suffix(".pdf"), bbox_inches="tight")
    _plt().close(fig)


# The one line to switch to the shared save helper (issue 28) once results/figures.py offers one:
#   save = figures.save_figure   (it must write the PNG at 300 dpi and a PDF beside it, as _save_png_pdf does)
save = _save_png_pdf


def pdf_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".pdf")


def _shade(ax, zones: dict[str, list[int]], alpha: float = 0.18, label: bool = True) -> None:
    """Shade each rule's zone cuts (``zones``: rule -> cuts; the MSE zone may be a span of unattacked cuts)."""
    for rule, cuts in zones.items():
        color, hatch, text = ZONE_STYLE[rule]
        for i, k in enumerate(cuts):
            ax.axvspan(k - 0.45, k + 0.45, facecolor=color if hatch is None else "none", edgecolor=color,
                       hatch=hatch, alpha=alpha if hatch is None else (0.3 if rule == "mse" else 0.6), lw=0,
                       label=text if label and i == 0 else None)


def _threshold(zone: dict[str, Any]) -> tuple[float, str]:
    f = zone.get("fidelity")
    if f:
        return f["threshold_per_element"], f"paper's high-fidelity MSE (0.02 / {f['channels']} channels)"
    return 0.02 / 3, "paper's high-fidelity MSE (0.02 / 3 channels)"


def _xticks(ax, cuts: list[int], names: dict[int, str]) -> None:
    ax.set_xticks(cuts)
    ax.set_xticklabels([f"{k}\n{names.get(k, '')}" for k in cuts], fontsize=8, rotation=0 if len(cuts) <= 10 else 60)
    ax.set_xlabel("cut (blocks on the edge)", fontsize=9)


def zone_spans(zone: dict[str, Any]) -> dict[str, list[int]]:
    """The cuts each rule shades: the raw and scale-free zone cuts; for MSE the zone cut (and the unattacked cuts
    before it back to the previous attacked cut: the jump happened somewhere there)."""
    out: dict[str, list[int]] = {}
    if zone.get("found"):
        out["raw"] = list(zone["zone_cuts"])
    sf = zone.get("scale_free") or {}
    if sf.get("found"):
        out["scale_free"] = list(sf["zone_cuts"])
    m = zone.get("mse") or {}
    if m.get("found"):
        out["mse"] = list(range(m["from_cut"] + 1, m["zone_cut"] + 1))
    return out


def _errbar(ax, x, y, lo, hi, **kw):
    yerr = None
    if lo is not None and hi is not None and all(v is not None for v in lo + hi):
        yerr = [[max(0.0, v - a) for v, a in zip(y, lo)], [max(0.0, b - v) for v, b in zip(y, hi)]]
    return ax.errorbar(x, y, yerr=yerr, capsize=2, ms=4, lw=1.2, **kw)


def plot_profiles(series: list[dict[str, Any]], zones: dict[str, list[int]], path: str | Path, title: str = "",
                  note: str | None = None, threshold: tuple[float, str] | None = None) -> None:
    """The shared figure: (top, if any series has MSE) MSE / mean-image baseline with the 70% ceiling and the
    baseline; (middle) R_c^2 and tr(Sigma), log scale; (bottom) the within-class fraction R_c^2 / tr(Sigma). All
    panels share the cuts; each rule's zone is shaded in every panel (``zones``: rule -> cuts). ``series``: dicts
    with ``label``, ``cuts``, ``names`` (cut -> block) and lists ``rc2``, ``tr``, ``frac``, optional ``mse_frac``
    (None where not attacked) and ``*_lo`` / ``*_hi`` interval bounds (bootstrap or seed spread, named in
    ``err``). ``note`` (e.g. where the rules disagree) is printed under the axes."""
    plt = _plt()
    attack = any(any(v is not None for v in s.get("mse_frac") or []) for s in series)
    n = 3 if attack else 2
    cuts = sorted({k for s in series for k in s["cuts"]})
    names = {k: v for s in series for k, v in s["names"].items()}
    fig, axes = plt.subplots(n, 1, figsize=(max(6.5, 0.42 * len(cuts) + 3.5), 2.5 * n),
                             sharex=True, squeeze=False)
    axes = [a[0] for a in axes]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    i = 0
    if attack:
        ax = axes[0]
        _shade(ax, zones)
        for j, s in enumerate(series):
            pts = [(k, v, lo, hi) for k, v, lo, hi in zip(s["cuts"], s["mse_frac"], s.get("mse_frac_lo") or s["mse_frac"],
                                                          s.get("mse_frac_hi") or s["mse_frac"]) if v is not None]
            if pts:
                x, y, lo, hi = map(list, zip(*pts))
                _errbar(ax, x, y, lo if s.get("mse_frac_lo") else None, hi if s.get("mse_frac_hi") else None,
                        marker="o", color=colors[j % len(colors)], label=f"MSE / baseline {s['label']}".strip())
        ax.axhline(1.0, color="black", lw=0.8, ls="-", label="mean-image baseline (1.0)")
        ax.axhline(0.7, color="gray", lw=0.8, ls="--", label="ceiling used for label smoothing (0.7)")
        if threshold:
            ax.axhline(threshold[0], color="gray", lw=0.8, ls=":", label=threshold[1])
        ax.set_ylabel("attack MSE / mean-image MSE", fontsize=8)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7, loc="upper left", framealpha=0.85)
        i = 1
    ax = axes[i]
    _shade(ax, zones, label=not attack)
    for j, s in enumerate(series):
        c = colors[j % len(colors)]
        _errbar(ax, s["cuts"], [max(v, 1e-12) for v in s["rc2"]], s.get("rc2_lo"), s.get("rc2_hi"), marker="s", color=c,
                label=f"R_c^2 (class mean) {s['label']}".strip())
        _errbar(ax, s["cuts"], [max(v, 1e-12) for v in s["tr"]], s.get("tr_lo"), s.get("tr_hi"), marker="v", color=c,
                ls="--", alpha=0.7, label=f"tr(Sigma) {s['label']}".strip())
    ax.set_yscale("log")
    ax.set_ylabel("R_c^2, tr(Sigma)", fontsize=8)
    ax.legend(fontsize=7, loc="lower left", framealpha=0.85)
    ax = axes[i + 1]
    _shade(ax, zones, label=False)
    for j, s in enumerate(series):
        _errbar(ax, s["cuts"], s["frac"], s.get("frac_lo"), s.get("frac_hi"), marker="^", color=colors[j % len(colors)],
                label=f"within-class fraction {s['label']}".strip())
    ax.set_ylabel("R_c^2 / tr(Sigma)", fontsize=8)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="lower left", framealpha=0.85)
    err = next((s["err"] for s in series if s.get("err")), None)
    if err:
        axes[0].set_title(f"error bars: {err}", fontsize=7, loc="right")
    for a in axes:
        a.tick_params(labelsize=8)
    _xticks(axes[-1], cuts, names)
    if note:   # under the figure (the save keeps it: bbox_inches="tight")
        fig.text(0.01, -0.005, "\n".join(textwrap.wrap("Rules disagree: " + note, 140)), fontsize=7, va="top",
                 ha="left")
    save(fig, path, title)


def sweep_series(rows: list[dict[str, Any]], label: str = "") -> dict[str, Any]:
    """One sweep's rows as a ``plot_profiles`` series (bootstrap 95% intervals where the rows hold them)."""
    def ci(key, i):
        vals = [r.get(key) for r in rows]
        return [v[i] for v in vals] if all(vals) else None
    return {"label": label, "cuts": [r["cut"] for r in rows], "names": {r["cut"]: r["block"] for r in rows},
            "rc2": [r["rc2_mean"] for r in rows], "rc2_lo": ci("rc2_ci95", 0), "rc2_hi": ci("rc2_ci95", 1),
            "tr": [r.get("total_variance", r["sigma2"] * r["d"]) for r in rows],
            "tr_lo": ci("total_ci95", 0), "tr_hi": ci("total_ci95", 1),
            "frac": [r["within_fraction"] for r in rows], "frac_lo": ci("frac_ci95", 0), "frac_hi": ci("frac_ci95", 1),
            "mse_frac": [r["mse"] / r["baseline_mse"] if r.get("mse") is not None and r.get("baseline_mse") else None
                         for r in rows],
            "err": "bootstrap 95% interval over the probe images" if ci("rc2_ci95", 0) else None}


def plot_sweep(rows: list[dict[str, Any]], zone: dict[str, Any], path: str | Path, title: str = "") -> None:
    """One sweep: ``plot_profiles`` of its rows with each rule's zone shaded and the disagreement line."""
    thr = _threshold(zone)
    base = [r["baseline_mse"] for r in rows if r.get("baseline_mse")]
    threshold = (thr[0] / (sum(base) / len(base)), thr[1] + " / mean baseline") if base else None
    plot_profiles([sweep_series(rows)], zone_spans(zone), path, title, zone.get("disagreement"), threshold)


def plot_compare(sweeps: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]], path: str | Path, title: str = "") -> None:
    """Overlay of several sweeps (e.g. label forms, first seed): ``plot_profiles`` with one series per sweep; the
    zones shaded are the first sweep's."""
    first = next(iter(sweeps.values()))
    plot_profiles([sweep_series(rows, name) for name, (rows, _) in sweeps.items()], zone_spans(first[1]), path,
                  title + f" (zones of {next(iter(sweeps))})")


def save_recon_strip(path: str | Path, strips: dict[str, dict[str, torch.Tensor]], title: str = "") -> None:
    """Originals on top, then one row of reconstructions per cut (``strips``: label -> {originals, recon});
    300-dpi PNG and PDF."""
    first = next(iter(strips.values()))
    n = min(int(s["recon"].shape[0]) for s in strips.values())
    fig = image_grid([("original", first["originals"][:n]), *((k, s["recon"][:n]) for k, s in strips.items())], n=n)
    save(fig, path, title)
