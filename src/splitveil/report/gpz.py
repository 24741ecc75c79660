"""Tables, text and files of a GPZ sweep (``experiments/gpz.py``) and of a label-form comparison: markdown and
CSV tables, the zone summary, and ``write_sweep`` / ``write_compare`` (gpz.md, gpz.csv, zone.json, gpz.png,
recon_strip.png; compare.md / .csv / .png)."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from ..utils import atomic_write_text
from .gpz_plots import plot_compare, plot_sweep, save_recon_strip


def zone_summary(zone: dict[str, Any]) -> str:
    if not zone["found"]:
        s = "no transition zone found (paper's rule: R_c^2 never drops between consecutive swept cuts)"
    else:
        blocks = ", ".join(f"{k} ({b})" for k, b in zip(zone["zone_cuts"], zone["zone_blocks"]))
        s = (f"transition zone (paper's rule): cut {blocks}; largest relative R_c^2 drop {zone['max_drop']:.3f} "
             f"into cut {zone['first_drop_cut']}")
        if len(zone["zone_cuts"]) > 1:
            s += " (second zone by the paper's second-zone rule)"
    b = zone.get("bootstrap")
    if b:
        s += f"; bootstrap ({b['resamples']} resamples of the probe images): zone found in {b['found_share']:.0%}"
        if "first_cut_ci95" in b:
            s += f", zone cut 95% interval {b['first_cut_ci95'][0]}..{b['first_cut_ci95'][1]}"
        if "agreement" in b:
            s += f", {b['agreement']:.0%} agree with cut {zone['first_drop_cut']}"
    f = zone.get("fidelity")
    if f:
        s += (f"; high-fidelity reconstructions (MSE < {f['threshold_per_element']:.4g} per element = the paper's "
              f"{f['paper_threshold_summed']} summed over {f['channels']} channels) up to cut "
              f"{f['deepest_high_fidelity_cut'] if f['deepest_high_fidelity_cut'] is not None else '- (none)'}")
    return s



def _in_zone(zone: dict[str, Any], k: int) -> bool:
    return bool(zone.get("found")) and k in zone["zone_cuts"]


def _f(v: Any, fmt: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "-inf" if v < 0 else "inf"
    return format(v, fmt)


def markdown_table(rows: list[dict[str, Any]], zone: dict[str, Any]) -> str:
    attack = any(r.get("mse") is not None for r in rows)
    head = ["cut", "block", "shape", "d", "R_c^2 mean +- std", "R_c^2 95% CI", "drop", "within-class frac", "sigma_feat^2",
            "d/2 ln(2pie s^2)", "D/2 ln(2pie R^2/D)+lnK", "edge params %", "edge FLOPs %", "payload B"]
    several = any(r.get("worst_attack") for r in rows)   # a suite of attacks: name the worst case's
    if attack:
        head += ["MSE", "PSNR", "SSIM"] + (["worst-case attack"] if several else [])
    head.append("zone")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    drops = dict(zip([r["cut"] for r in rows[1:]], zone.get("drops", [])))
    for r in rows:
        ci = r.get("rc2_ci95")
        cells = [str(r["cut"]), r["block"], "x".join(map(str, r["shape"])), str(r["d"]),
                 f"{_f(r['rc2_mean'], '.4g')} +- {_f(r['rc2_std'], '.2g')}",
                 f"{ci[0]:.4g}..{ci[1]:.4g}" if ci else "-", _f(drops.get(r["cut"]), ".3f"), _f(r["within_fraction"], ".4f"),
                 _f(r["sigma2"], ".4g"), _f(r["h_feat_bound"], ".4g"), _f(r["h_dec_bound"], ".4g"),
                 _f(100 * r["edge_params_share"], ".1f"), _f(100 * r["edge_flops_share"], ".1f"), f"{r['payload_bytes']:,}"]
        if attack:
            cells += [_f(r.get("mse"), ".4f"), _f(r.get("psnr"), ".2f"), _f(r.get("ssim"), ".3f")]
            if several:
                cells.append(r.get("worst_attack") or "-")
        cells.append("*" if _in_zone(zone, r["cut"]) else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


CSV_FIELDS = ["cut", "block", "shape", "d", "probe_images", "rc2_mean", "rc2_ci_low", "rc2_ci_high", "rc2_std", "rc2_max",
              "rc2_classes", "rc2_excluded", "rc2_per_class", "sigma2",
              "within_fraction", "h_feat_bound", "h_dec_bound", "num_classes", "edge_params", "edge_params_share",
              "edge_flops", "edge_flops_share", "payload_bytes", "mse", "mse_std", "psnr", "ssim", "worst_attack", "in_zone",
              "zone_rule"]


def csv_text(rows: list[dict[str, Any]], zone: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        ci = r.get("rc2_ci95") or [None, None]
        w.writerow({**r, "shape": "x".join(map(str, r["shape"])), "rc2_ci_low": ci[0], "rc2_ci_high": ci[1],
                    "rc2_per_class": ";".join(f"{c}:{v:.6g}" for c, v in r["rc2_per_class"].items()),
                    "in_zone": int(_in_zone(zone, r["cut"])), "zone_rule": zone["rule"]})
    return buf.getvalue()


# -- files of a sweep and of a comparison ------------------------------------------------------------------------
def write_sweep(result: dict[str, Any]) -> dict[str, str]:
    """``gpz.md`` / ``gpz.csv`` (table, zone summary), ``gpz.png`` (MSE and R_c^2 against depth, zone shaded) and,
    when the sweep attacked, ``recon_strip.png`` (a reconstruction row per cut) in the sweep's folder, for the
    result of ``GPZSweep.run``; returns the files (also as ``result["files"]``)."""
    import torch

    run_dir = Path(result["run_dir"])
    rows, zone = result["rows"], result["zone"]
    title = f"{result['dataset']} {result['model']} ({result['defense']}), accuracy {result['accuracy']:.3f}"
    md = f"# GPZ sweep: {title}\n\n{markdown_table(rows, zone)}\n\n{zone_summary(zone)}\n\nMethod: {zone['method']}\n"
    if result["notes"]:
        md += "\nNotes: " + "; ".join(result["notes"]) + "\n"
    atomic_write_text(run_dir / "gpz.md", md)
    atomic_write_text(run_dir / "gpz.csv", csv_text(rows, zone))
    plot_sweep(rows, zone, run_dir / "gpz.png", title)
    files = {"table_md": str(run_dir / "gpz.md"), "table_csv": str(run_dir / "gpz.csv"), "plot": str(run_dir / "gpz.png")}
    strips = {f"{r['cut']} {r['block']}": torch.load(result["recon"][r["cut"]], weights_only=True)
              for r in rows if r["cut"] in (result.get("recon") or {})}
    if strips:
        save_recon_strip(run_dir / "recon_strip.png", strips, title)
        files["recon_strip"] = str(run_dir / "recon_strip.png")
    result["files"] = files
    return files


def compare_markdown(res: dict[str, Any]) -> str:
    """The label-form comparison of ``experiments.gpz.run_compare``: one line per form (accuracy, zone per seed,
    the deepest cut's R_c^2 and MSE), then R_c^2 / MSE per cut and form (mean +- sample std over seeds)."""
    results, summary, seeds = res["results"], res["summary"], res["seeds"]
    lines = [f"Seeds: {', '.join(map(str, seeds))}; mean +- sample std over seeds.\n",
             "| label form | defense | accuracy | zone cut per seed (paper's rule) | deepest cut R_c^2 | deepest cut MSE |",
             "|---|---|---|---|---|---|"]
    for form, per_seed in results.items():
        rs = list(per_seed.values())
        s, last = summary[form], summary[form]["per_cut"][-1]
        lines.append(f"| {form} | {rs[0]['defense']} | {s['accuracy']:.4f} +- {s['accuracy_seed_std']:.4f} | "
                     f"{', '.join(s['zones'])} | {last['rc2_mean']:.4g} +- {last['rc2_seed_std']:.2g} | "
                     + (f"{last['mse']:.4f} +- {last['mse_seed_std']:.4f}" if last["mse"] is not None else "-") + " |")
    per_cut_md = ["| cut | block | " + " | ".join(f"{f} R_c^2 / MSE" for f in results) + " |",
                  "|---|---|" + "---|" * len(results)]
    for i, r in enumerate(next(iter(summary.values()))["per_cut"]):
        cells = []
        for f in results:
            c = summary[f]["per_cut"][i]
            cells.append(f"{c['rc2_mean']:.4g} +- {c['rc2_seed_std']:.2g} / " +
                         (f"{c['mse']:.4f} +- {c['mse_seed_std']:.4f}" if c["mse"] is not None else "-"))
        per_cut_md.append(f"| {r['cut']} | {r['block']} | " + " | ".join(cells) + " |")
    return "# GPZ label-form comparison\n\n" + "\n".join(lines) + "\n\n" + "\n".join(per_cut_md) + "\n"


def write_compare(res: dict[str, Any]) -> str:
    """``compare.md``, ``compare.csv`` (every row of every sweep) and ``compare.png`` (R_c^2 and MSE overlaid per
    form, first seed) in the comparison's folder; returns the markdown (also as ``res["table_md"]``)."""
    cdir = Path(res["dir"])
    results, seeds = res["results"], res["seeds"]
    md = compare_markdown(res)
    atomic_write_text(cdir / "compare.md", md)
    buf = io.StringIO()
    w = csv.DictWriter(buf, ["label_form", "seed", "accuracy"] + CSV_FIELDS[:-2], extrasaction="ignore")
    w.writeheader()
    for form, per_seed in results.items():
        for seed, r in per_seed.items():
            for row in r["rows"]:
                ci = row.get("rc2_ci95") or [None, None]
                w.writerow({"label_form": form, "seed": seed, "accuracy": r["accuracy"], **row,
                            "shape": "x".join(map(str, row["shape"])), "rc2_ci_low": ci[0], "rc2_ci_high": ci[1],
                            "rc2_per_class": ";".join(f"{c}:{v:.6g}" for c, v in row["rc2_per_class"].items())})
    atomic_write_text(cdir / "compare.csv", buf.getvalue())
    plot_compare({f: (per_seed[seeds[0]]["rows"], per_seed[seeds[0]]["zone"]) for f, per_seed in results.items()},
                 cdir / "compare.png", f"{res['model']}: label forms (seed {seeds[0]})")
    res["table_md"] = md
    return md
