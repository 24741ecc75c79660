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
from .gpz_plots import pdf_path, plot_compare, plot_sweep, save_recon_strip


def _rule_text(z: dict[str, Any], what: str) -> str:
    if not z.get("found"):
        return f"no zone by the {what} (it never drops between consecutive swept cuts)"
    blocks = ", ".join(f"{k} ({b})" for k, b in zip(z["zone_cuts"], z["zone_blocks"]))
    s = f"zone by the {what}: cut {blocks}; largest relative drop {z['max_drop']:.3f} into cut {z['first_drop_cut']}"
    if len(z["zone_cuts"]) > 1:
        s += " (second zone by the paper's second-zone rule)"
    b = z.get("bootstrap")
    if b:
        s += f"; bootstrap ({b['resamples']} resamples of the probe images): zone found in {b['found_share']:.0%}"
        if "first_cut_ci95" in b:
            s += f", zone cut 95% interval {b['first_cut_ci95'][0]}..{b['first_cut_ci95'][1]}"
        if "agreement" in b:
            s += f", {b['agreement']:.0%} agree with cut {z['first_drop_cut']}"
    return s


def mse_zone_text(m: dict[str, Any]) -> str:
    """The zone by MSE in words (the fraction MSE / mean-image baseline between consecutive attacked cuts)."""
    if not m or len(m.get("cuts", [])) < 2:
        return "zone by MSE: needs attack MSE and the mean-image baseline at 2 or more cuts"
    if not m["found"]:
        return "zone by MSE: the fraction MSE / baseline never rises between consecutive attacked cuts"
    s = (f"zone by MSE: cut {m['zone_cut']} ({m['zone_block']}); MSE / mean-image baseline jumps most "
         f"({m['max_jump']:+.3f}) from cut {m['from_cut']}")
    if not m["localised"]:
        s += f" (cuts {m['from_cut'] + 1}..{m['zone_cut'] - 1} not attacked: the jump is not localised to one cut)"
    return s


def _check_text(name: str, c: dict[str, Any]) -> str:
    if c.get("zone_cut") is None:
        return f"{name}: no zone"
    s = f"{name} zone cut {c['zone_cut']}: "
    if "jump" in c:
        s += (f"MSE / baseline {c['fraction_before']:.3f} at cut {c['zone_cut'] - 1} -> {c['fraction_at']:.3f} "
              f"(jump {c['jump']:+.3f}, rank {c['jump_rank']} among the jumps)")
    else:
        s += "cut or its predecessor not attacked"
    if c.get("matches_mse") is not None:
        s += "; matches the zone by MSE" if c["matches_mse"] else "; not the zone by MSE"
    return s


def zone_summary(zone: dict[str, Any]) -> str:
    """The zone by the paper's rule on R_c^2, by the same rule on the within-class fraction, and by MSE, whether
    the MSE localises each, the paper's high-fidelity cuts, and one line where the two rules disagree."""
    parts = [_rule_text(zone, "paper's rule on R_c^2 (raw)")]
    if zone.get("scale_free"):
        parts.append(_rule_text(zone["scale_free"], "same rule on the within-class fraction (scale-free)"))
    if zone.get("mse") and zone["mse"].get("cuts"):
        parts.append(mse_zone_text(zone["mse"]))
        parts += [_check_text(n, c) for n, c in (zone.get("checks") or {}).items()]
    f = zone.get("fidelity")
    if f:
        parts.append(f"high-fidelity reconstructions (MSE < {f['threshold_per_element']:.4g} per element = the "
                     f"paper's {f['paper_threshold_summed']} summed over {f['channels']} channels) up to cut "
                     f"{f['deepest_high_fidelity_cut'] if f['deepest_high_fidelity_cut'] is not None else '- (none)'}")
    if zone.get("disagreement"):
        parts.append(f"**the rules disagree**: {zone['disagreement']}")
    elif zone.get("scale_free"):
        parts.append("the raw and the scale-free rule agree")
    return parts[0] + "".join(f"\n  - {p}" for p in parts[1:])


def _in_zone(zone: dict[str, Any], k: int) -> bool:
    return bool(zone.get("found")) and k in zone["zone_cuts"]


def zone_marks(zone: dict[str, Any], k: int) -> str:
    """R: in the raw zone, S: in the scale-free zone, M: the zone by MSE."""
    marks = "R" if _in_zone(zone, k) else ""
    if _in_zone(zone.get("scale_free") or {}, k):
        marks += "S"
    m = zone.get("mse") or {}
    if m.get("found") and m["zone_cut"] == k:
        marks += "M"
    return marks


def _f(v: Any, fmt: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "-inf" if v < 0 else "inf"
    return format(v, fmt)


def _ci(ci: Any, fmt: str) -> str:
    return f"{format(ci[0], fmt)}..{format(ci[1], fmt)}" if ci else "-"


def _total(r: dict[str, Any]) -> float:
    return r.get("total_variance", r["sigma2"] * r["d"])


def markdown_table(rows: list[dict[str, Any]], zone: dict[str, Any]) -> str:
    attack = any(r.get("mse") is not None for r in rows)
    head = ["cut", "block", "shape", "d", "R_c^2 mean +- std", "R_c^2 95% CI", "R_c^2 drop", "tr(Sigma)", "tr(Sigma) 95% CI",
            "within-class frac", "frac 95% CI", "frac drop", "sigma_feat^2", "d/2 ln(2pie s^2)", "D/2 ln(2pie R^2/D)+lnK",
            "edge params %", "edge FLOPs %", "payload B"]
    several = any(r.get("worst_attack") for r in rows)   # a suite of attacks: name the worst case's
    if attack:
        head += ["MSE", "baseline MSE", "MSE / baseline", "PSNR", "SSIM"] + (["worst-case attack"] if several else [])
    head.append("zone (R raw, S scale-free, M MSE)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    drops = dict(zip([r["cut"] for r in rows[1:]], zone.get("drops", [])))
    fdrops = dict(zip([r["cut"] for r in rows[1:]], (zone.get("scale_free") or {}).get("drops", [])))
    for r in rows:
        cells = [str(r["cut"]), r["block"], "x".join(map(str, r["shape"])), str(r["d"]),
                 f"{_f(r['rc2_mean'], '.4g')} +- {_f(r['rc2_std'], '.2g')}", _ci(r.get("rc2_ci95"), ".4g"),
                 _f(drops.get(r["cut"]), ".3f"), _f(_total(r), ".4g"), _ci(r.get("total_ci95"), ".4g"),
                 _f(r["within_fraction"], ".4f"), _ci(r.get("frac_ci95"), ".4f"), _f(fdrops.get(r["cut"]), ".3f"),
                 _f(r["sigma2"], ".4g"), _f(r["h_feat_bound"], ".4g"), _f(r["h_dec_bound"], ".4g"),
                 _f(100 * r["edge_params_share"], ".1f"), _f(100 * r["edge_flops_share"], ".1f"), f"{r['payload_bytes']:,}"]
        if attack:
            frac = r["mse"] / r["baseline_mse"] if r.get("mse") is not None and r.get("baseline_mse") else None
            cells += [_f(r.get("mse"), ".4f"), _f(r.get("baseline_mse"), ".4f"), _f(frac, ".3f"),
                      _f(r.get("psnr"), ".2f"), _f(r.get("ssim"), ".3f")]
            if several:
                cells.append(r.get("worst_attack") or "-")
        cells.append(zone_marks(zone, r["cut"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


CSV_FIELDS = ["cut", "block", "shape", "d", "probe_images", "rc2_mean", "rc2_ci_low", "rc2_ci_high", "rc2_std", "rc2_max",
              "rc2_classes", "rc2_excluded", "rc2_per_class", "sigma2", "total_variance", "total_ci_low", "total_ci_high",
              "within_fraction", "frac_ci_low", "frac_ci_high", "between_within", "h_feat_bound", "h_dec_bound",
              "num_classes", "edge_params", "edge_params_share", "edge_flops", "edge_flops_share", "payload_bytes", "mse",
              "mse_std", "baseline_mse", "mse_fraction", "psnr", "ssim", "worst_attack", "in_zone", "in_zone_scale_free",
              "mse_zone", "zone_rule"]


def _csv_row(r: dict[str, Any]) -> dict[str, Any]:
    ci, tci, fci = (r.get(k) or [None, None] for k in ("rc2_ci95", "total_ci95", "frac_ci95"))
    frac = r["mse"] / r["baseline_mse"] if r.get("mse") is not None and r.get("baseline_mse") else None
    return {**r, "shape": "x".join(map(str, r["shape"])), "rc2_ci_low": ci[0], "rc2_ci_high": ci[1],
            "total_variance": _total(r), "total_ci_low": tci[0], "total_ci_high": tci[1], "frac_ci_low": fci[0],
            "frac_ci_high": fci[1], "mse_fraction": frac,
            "rc2_per_class": ";".join(f"{c}:{v:.6g}" for c, v in r["rc2_per_class"].items())}


def csv_text(rows: list[dict[str, Any]], zone: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    m = zone.get("mse") or {}
    for r in rows:
        w.writerow({**_csv_row(r), "in_zone": int(_in_zone(zone, r["cut"])),
                    "in_zone_scale_free": int(_in_zone(zone.get("scale_free") or {}, r["cut"])),
                    "mse_zone": int(bool(m.get("found")) and m["zone_cut"] == r["cut"]), "zone_rule": zone["rule"]})
    return buf.getvalue()


# -- files of a sweep and of a comparison ------------------------------------------------------------------------
def write_sweep(result: dict[str, Any]) -> dict[str, str]:
    """``gpz.md`` / ``gpz.csv`` (table, zone summary), ``gpz.png`` + ``gpz.pdf`` (MSE / baseline, R_c^2 and
    tr(Sigma), within-class fraction against depth, each rule's zone shaded) and, when the sweep attacked,
    ``recon_strip.png`` + ``.pdf`` (a reconstruction row per cut; 300 dpi) in the sweep's folder, for the
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
    files = {"table_md": str(run_dir / "gpz.md"), "table_csv": str(run_dir / "gpz.csv"), "plot": str(run_dir / "gpz.png"),
             "plot_pdf": str(pdf_path(run_dir / "gpz.png"))}
    strips = {f"{r['cut']} {r['block']}": torch.load(result["recon"][r["cut"]], weights_only=True)
              for r in rows if r["cut"] in (result.get("recon") or {})}
    if strips:
        save_recon_strip(run_dir / "recon_strip.png", strips, title)
        files["recon_strip"] = str(run_dir / "recon_strip.png")
        files["recon_strip_pdf"] = str(pdf_path(run_dir / "recon_strip.png"))
    result["files"] = files
    return files


def _iv(t: Any, fmt: str) -> str:
    return f"{format(t[0], fmt)} [{format(t[1], fmt)}, {format(t[2], fmt)}]"


def ls_reading_markdown(ls: dict[str, Any] | None) -> str:
    """The label-smoothing reading (``results.gpz.label_smoothing_reading``) as a table per form and one verdict
    line: does the form contract the classes (the scale-free within-class fraction falls) or only rescale them
    (R_c^2 and tr(Sigma) fall, the fraction does not), and its MSE effect where MSE is below the ceiling."""
    if not ls:
        return "Label-smoothing reading: needs a one-hot form and 2 or more seeds.\n"
    out = []
    for form, r in ls["forms"].items():
        out.append(f"**{form} against {ls['base']}** (ratios of seed means; differences {form} - {ls['base']} with "
                   "Welch 95% intervals over seeds):\n")
        attacked = any("mfrac_base" in c for c in r["per_cut"])
        head = ["cut", "R_c^2 ratio", "R_c^2 diff", "tr(Sigma) ratio", f"within-class frac {ls['base']} / {form}",
                "frac diff"] + (["MSE / baseline", "MSE diff"] if attacked else [])
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in r["per_cut"]:
            cells = [str(c["cut"]), f"{c['rc2_ratio']:.3f}", _iv(c["rc2_diff"], "+.4g") if "rc2_diff" in c else "-",
                     f"{c['tr_ratio']:.3f}", f"{c['frac_base']:.4f} / {c['frac_form']:.4f}",
                     _iv(c["frac_diff"], "+.4f") if "frac_diff" in c else "-"]
            if attacked:
                if "mfrac_base" in c:
                    cells.append(f"{c['mfrac_base']:.3f} / {c['mfrac_form']:.3f}"
                                 + ("" if c["below_ceiling"] else " (at the ceiling)"))
                    cells.append(_iv(c["mse_diff"], "+.4f") if "mse_diff" in c else "-")
                else:
                    cells += ["-", "-"]
            out.append("| " + " | ".join(cells) + " |")
        v = r["verdict"]
        text = {"contracts the classes": "contracts the classes: R_c^2 and the scale-free within-class fraction are "
                                         "both lower beyond the seed spread",
                "only rescales": "only rescales: R_c^2 is lower beyond the seed spread, the within-class fraction "
                                 "is not (the features shrink as a whole, which an inverse network undoes)",
                "does not shrink R_c^2": "does not shrink R_c^2 beyond the seed spread"}.get(v, "no verdict (one seed)")
        out.append(f"\nVerdict at the deepest cut ({r['deepest_cut']}): {form} {text}.")
        sub = r["below_ceiling_mse"]
        if sub:
            out.append(f"MSE below its ceiling (cuts where MSE < {ls['ceiling']:.0%} of the mean-image baseline): " +
                       "; ".join(f"cut {m['cut']} {_iv(m['diff'], '+.4f')} {m['verdict']}" for m in sub) + ".")
        elif attacked:
            out.append(f"MSE below its ceiling: no attacked cut has MSE under {ls['ceiling']:.0%} of the baseline "
                       "in both forms.")
        out.append("")
    return "\n".join(out) + "\n"


def compare_markdown(res: dict[str, Any]) -> str:
    """The label-form comparison of ``experiments.gpz.run_compare``: one line per form (accuracy, zone per seed by
    the raw and the scale-free rule, the deepest cut's R_c^2 and MSE), then R_c^2 / within-class fraction / MSE
    per cut and form (mean +- sample std over seeds), then the label-smoothing reading."""
    results, summary, seeds = res["results"], res["summary"], res["seeds"]
    lines = [f"Seeds: {', '.join(map(str, seeds))}; mean +- sample std over seeds.\n",
             "| label form | defense | accuracy | zone cut per seed (paper's rule, R_c^2) | zone cut per seed "
             "(scale-free) | deepest cut R_c^2 | deepest cut MSE |",
             "|---|---|---|---|---|---|---|"]
    for form, per_seed in results.items():
        rs = list(per_seed.values())
        s, last = summary[form], summary[form]["per_cut"][-1]
        lines.append(f"| {form} | {rs[0]['defense']} | {s['accuracy']:.4f} +- {s['accuracy_seed_std']:.4f} | "
                     f"{', '.join(s['zones'])} | {', '.join(s.get('zones_scale_free', []))} | "
                     f"{last['rc2_mean']:.4g} +- {last['rc2_seed_std']:.2g} | "
                     + (f"{last['mse']:.4f} +- {last['mse_seed_std']:.4f}" if last["mse"] is not None else "-") + " |")
    per_cut_md = ["| cut | block | " + " | ".join(f"{f} R_c^2 / within-class frac / MSE" for f in results) + " |",
                  "|---|---|" + "---|" * len(results)]
    for i, r in enumerate(next(iter(summary.values()))["per_cut"]):
        cells = []
        for f in results:
            c = summary[f]["per_cut"][i]
            cells.append(f"{c['rc2_mean']:.4g} +- {c['rc2_seed_std']:.2g} / "
                         f"{c['within_fraction']:.4f} +- {c['within_fraction_seed_std']:.4f} / " +
                         (f"{c['mse']:.4f} +- {c['mse_seed_std']:.4f}" if c["mse"] is not None else "-"))
        per_cut_md.append(f"| {r['cut']} | {r['block']} | " + " | ".join(cells) + " |")
    return ("# GPZ label-form comparison\n\n" + "\n".join(lines) + "\n\n" + "\n".join(per_cut_md) + "\n\n"
            "## Label smoothing on the scale-free probe\n\n" + ls_reading_markdown(res.get("label_smoothing")))


def write_compare(res: dict[str, Any]) -> str:
    """``compare.md``, ``compare.csv`` (every row of every sweep) and ``compare.png`` (R_c^2 and MSE overlaid per
    form, first seed) in the comparison's folder; returns the markdown (also as ``res["table_md"]``)."""
    cdir = Path(res["dir"])
    results, seeds = res["results"], res["seeds"]
    md = compare_markdown(res)
    atomic_write_text(cdir / "compare.md", md)
    buf = io.StringIO()
    w = csv.DictWriter(buf, ["label_form", "seed", "accuracy"] + CSV_FIELDS[:-4], extrasaction="ignore")
    w.writeheader()
    for form, per_seed in results.items():
        for seed, r in per_seed.items():
            for row in r["rows"]:
                w.writerow({"label_form": form, "seed": seed, "accuracy": r["accuracy"], **_csv_row(row)})
    atomic_write_text(cdir / "compare.csv", buf.getvalue())
    plot_compare({f: (per_seed[seeds[0]]["rows"], per_seed[seeds[0]]["zone"]) for f, per_seed in results.items()},
                 cdir / "compare.png", f"{res['model']}: label forms (seed {seeds[0]})")
    res["table_md"] = md
    return md
