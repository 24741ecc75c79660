"""GPZ benchmark: one model per (label form, seed), the probe (R_c^2 and the scale-free within-class fraction
R_c^2 / tr(Sigma), each with a bootstrap interval) at every cut, the attack suite (worst case over it) at every cut
of the transition region with the mean-image baseline, the zone by the paper's rule on R_c^2, by the same rule on
the within-class fraction and by MSE (the largest jump of MSE / baseline between consecutive attacked cuts), whether
the MSE localises each rule's zone, and the label-smoothing reading (contracts the classes or only rescales them).

    python benchmarks/gpz.py [--forms onehot,ls+0.3,ls-0.05] [--seeds 0,1,2] [--attack-cuts 2,8-16] [--threads 1]
    python benchmarks/gpz.py --config configs/gpz_vgg19_cifar10.yaml --attack-cuts 2,8-16     # the paper's regime (GPU)
    python benchmarks/gpz.py --estimate            # time one epoch of each stage and print the cost of the full run
    python benchmarks/gpz.py --from-json benchmarks/results/gpz.json --baseline-from-data   # re-read an export

Default budget (CPU): CIFAR-10 32x32, VGG19-BN x0.25, 20,000 train (augmented) / 500 test / 5,000 aux images,
20 epochs Adam 1e-3 (cosine); the inverse network at its default budget. Finished sweeps are reused from
<out>/runs/ (interrupt and rerun at will). Every call writes <out>/gpz.json (the export: rows per cut, zones,
budget), then <out>/gpz.md and gpz.png/.pdf from that export (``--from-json`` does only the second part, for an
export written before: its tables and figure are regenerated with both rules; a missing mean-image baseline is
recomputed from the export's data split with ``--baseline-from-data``: it does not depend on the model).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BOOT_KEYS = ("rc2_boot", "frac_boot")          # bootstrap resamples: summarised in the zone, not exported


def budget(args) -> dict:
    if args.config:
        tree = yaml.safe_load(Path(args.config).read_text())
        root = tree.get("data", {}).get("root")
        if root and not os.path.isabs(os.path.expanduser(root)):     # relative to the config file, as load_config
            tree["data"]["root"] = os.path.normpath(Path(args.config).resolve().parent / root)
        tree.update(progress=False)
        return tree
    return {
        "name": "gpz_bench4", "seed": 0, "device": "cpu", "progress": False, "threads": args.threads,
        "data": {"name": "cifar10", "root": args.data_root, "train_size": args.train_size, "test_size": args.test_size,
                 "aux_size": args.aux_size, "augment": args.augment},
        "model": {"name": args.model, "width": args.width, "cut": 1},
        "train": {"epochs": args.epochs, "batch_size": 128, "optimizer": "adam", "lr": 0.001, "weight_decay": 0.0,
                  "schedule": "cosine"},
        "defense": {"name": "none"},
        "attacks": yaml.safe_load(args.attacks),
        "eval": {"recon_images": 8},
    }


def budget_text(tree: dict, attack_cuts: str, probe_images: int) -> str:
    d, t, m = tree["data"], tree["train"], tree["model"]
    return (f"{d['name']} {str(d['image_size']) + ' px' if d.get('image_size') else '(native size)'}, {m['name']} x{m.get('width', 1.0)}, "
            f"{d.get('train_size') or 'all'} train{' (augmented)' if d.get('augment') else ''} / "
            f"{d.get('test_size') or 'all'} test / {d.get('aux_size')} aux images, {t['epochs']} epochs "
            f"{t['optimizer']} lr {t['lr']} ({t.get('schedule', 'constant')}); attack suite {tree.get('attacks')} at cuts "
            f"{attack_cuts}, worst case over the suite; probe on {probe_images} test images, 200 stratified bootstrap "
            "resamples")


# -- running the sweeps ------------------------------------------------------------------------------------------
def run_sweeps(args, tree: dict) -> dict:
    import dataclasses

    from splitveil.experiments import config_from_dict
    from splitveil.experiments.gpz import GPZSweep, with_label_form
    from splitveil.report.gpz import write_sweep

    out_dir = Path(args.out)
    cfg = config_from_dict(tree)
    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.time()
    res: dict[str, dict[str, dict]] = {}
    for form in forms:
        res[form] = {}
        for seed in seeds:
            sweep = GPZSweep(dataclasses.replace(cfg, defense=with_label_form(cfg.defense, form), seed=seed),
                             out_dir / "runs", probe_images=args.probe_images)
            att = sweep.run(args.attack_cuts, attack=True)
            write_sweep(att)
            out = sweep.run("all", attack=False)
            stored = sweep.load_rows()
            rows = [stored[r["cut"]] for r in out["rows"]]      # every cut's probe, with the attacks where run
            from splitveil.results.gpz import detect_zone
            zone = detect_zone(rows, channels=sweep.data.image_shape[0])
            res[form][str(seed)] = {"accuracy": out["accuracy"], "zone": zone, "run_dir": out["run_dir"],
                                    "recon": att.get("recon", {}),
                                    "rows": [{k: v for k, v in row.items() if k not in BOOT_KEYS} for row in rows]}
            print(f"[gpz bench] {form} seed {seed} done at {time.time() - t0:.0f} s", flush=True)
    return {"budget": tree, "attack_cuts": args.attack_cuts, "probe_images": args.probe_images,
            "command": "python benchmarks/gpz.py " + " ".join(sys.argv[1:]), "wall_s": time.time() - t0,
            "measured": time.strftime("%Y-%m-%d"), "results": res}


def estimate(args, tree: dict) -> dict:
    """Time one training epoch, one probe and one attack epoch of the budget (one-hot, the first seed) in a scratch
    folder, and extrapolate to the whole run: forms x seeds x (epochs x train epoch + cuts x probe + attacked cuts
    x attack epochs x attack epoch). The machine's load is recorded beside it."""
    import tempfile

    from splitveil.attacks import ATTACKS
    from splitveil.experiments import config_from_dict
    from splitveil.experiments.gpz import GPZSweep, parse_cuts
    from splitveil.params import coerce

    full = config_from_dict(tree)
    t1 = copy.deepcopy(tree)
    t1["train"]["epochs"] = 1
    specs = full.attack_params() or {"inverse_network": coerce(ATTACKS.get("inverse_network").Params, {})}
    att_epochs = {n: int(getattr(p, "epochs", 1)) for n, p in specs.items()}
    t1["attacks"] = {n: {**((tree.get("attacks") or {}).get(n) or {}), "epochs": 1} for n in specs}
    from splitveil.experiments import pipeline

    load0 = os.getloadavg()
    spent: dict[str, float] = {}
    real_prepare_data = pipeline.prepare_data

    def timed_data(*a, **k):                          # the data split, timed apart from the training epoch
        t = time.time()
        out = real_prepare_data(*a, **k)
        spent["data"] = time.time() - t
        return out
    with tempfile.TemporaryDirectory() as tmp:
        sweep = GPZSweep(config_from_dict(t1), tmp, probe_images=args.probe_images)
        pipeline.prepare_data = timed_data
        try:
            t = time.time()
            sweep.prepare()
            t_prepare = time.time() - t              # data + one training epoch + accuracy
        finally:
            pipeline.prepare_data = real_prepare_data
        t_data = spent.get("data", 0.0)
        cuts = parse_cuts(args.attack_cuts, sweep.block_names)
        t = time.time()
        sweep.probe(cuts[0])
        t_probe = time.time() - t
        t = time.time()
        sweep.attack(cuts[0])                         # every attack of the suite, one epoch each
        t_attack = time.time() - t
    n_cuts = len(sweep.block_names) - 1
    forms = len([f for f in args.forms.split(",") if f.strip()])
    seeds = len(args.seeds.split(","))
    t_epoch = t_prepare - t_data
    per_sweep = (t_data + full.train.epochs * t_epoch + n_cuts * t_probe
                 + len(cuts) * t_attack * max(att_epochs.values()))
    return {"data_s": t_data, "train_epoch_s": t_epoch, "probe_s": t_probe, "attack_epoch_s": t_attack,
            "attack_epochs": att_epochs, "train_epochs": full.train.epochs, "cuts": n_cuts, "attacked_cuts": len(cuts),
            "sweeps": forms * seeds, "per_sweep_s": per_sweep, "total_s": per_sweep * forms * seeds,
            "load_avg_before": load0, "load_avg_after": os.getloadavg(), "threads": tree.get("threads"),
            "note": "upper bound on this machine: the training epoch includes the test accuracy and the FLOP count; "
                    "the attack epoch (with its scoring) at the shallowest attacked cut (deeper cuts are cheaper to "
                    "encode)"}


# -- re-reading an export ---------------------------------------------------------------------------------------
def fill_baselines(export: dict) -> int:
    """The mean-image baseline of each seed's data split (the aux split's mean image against the test split, as the
    sweep scores it), for exported rows that have an MSE and no baseline (flagged ``baseline_recomputed``);
    returns how many rows were filled. Model-independent: only the data."""
    from splitveil.attacks import mean_image_baseline
    from splitveil.experiments import config_from_dict
    from splitveil.experiments import pipeline

    cache: dict[str, float] = {}
    filled = 0
    for per_seed in export["results"].values():
        for seed, r in per_seed.items():
            if not any(row.get("mse") is not None and row.get("baseline_mse") is None for row in r["rows"]):
                continue
            if seed not in cache:
                cfg = config_from_dict({**export["budget"], "seed": int(seed)})
                data, _ = pipeline.prepare_data(cfg, pipeline.Seeds(cfg.seed))
                cache[seed] = float(mean_image_baseline(data)["mse"])
            for row in r["rows"]:
                if row.get("mse") is not None and row.get("baseline_mse") is None:
                    row["baseline_mse"] = cache[seed]
                    row["baseline_recomputed"] = True
                    filled += 1
    return filled


def analyse(export: dict) -> dict:
    """Zones by the three rules per (form, seed), recomputed from the exported rows; the bootstrap summaries the
    run stored (the resamples are not exported) are kept where they exist."""
    from splitveil.results.gpz import detect_zone

    out = {}
    ch = 1 if export["budget"]["data"]["name"] in ("mnist", "fashion_mnist", "kmnist", "emnist") else 3
    for form, per_seed in export["results"].items():
        out[form] = {}
        for seed, r in per_seed.items():
            z = detect_zone(r["rows"], channels=ch)
            stored = r.get("zone") or {}
            if stored.get("zone_cuts") is not None and stored["zone_cuts"] != z["zone_cuts"]:
                raise SystemExit(f"{form} seed {seed}: the stored zone {stored['zone_cuts']} differs from the "
                                 f"recomputed {z['zone_cuts']}: the export is inconsistent")
            if stored.get("bootstrap"):
                z["bootstrap"] = stored["bootstrap"]
            if (stored.get("scale_free") or {}).get("bootstrap") and z.get("scale_free"):
                z["scale_free"]["bootstrap"] = stored["scale_free"]["bootstrap"]
            out[form][seed] = z
    return out


def _zcut(z: dict) -> str:
    return "+".join(map(str, z["zone_cuts"])) if z.get("found") else "none"


def _boot(z: dict) -> str:
    b = z.get("bootstrap")
    return f" ({b['agreement']:.0%} of resamples)" if b and "agreement" in b else ""


def _mzone(m: dict) -> str:
    if not m.get("found"):
        return "none"
    return f"{m['zone_cut']} (from {m['from_cut']}{'' if m['localised'] else ', not localised'})"


def render(export: dict, out_dir: Path, source: str, docs: str | None = None) -> str:
    from splitveil.report.gpz import ls_reading_markdown
    from splitveil.report.gpz_plots import plot_profiles, save_recon_strip, zone_spans
    from splitveil.results.gpz import (detect_zone, label_smoothing_reading, mean_ci, mse_fraction,
                                       paper_fidelity_threshold, welch)

    zones = analyse(export)
    res = export["results"]
    forms = list(res)
    seeds = list(next(iter(res.values())))
    tree = export["budget"]
    md = [f"# GPZ benchmark ({tree['model']['name']} x{tree['model'].get('width', 1.0)}, {tree['data']['name']})\n",
          source + "\n",
          f"Budget: {budget_text(tree, export['attack_cuts'], export.get('probe_images', 500))}. Forms {forms}, seeds "
          f"{seeds}. Command: `{export.get('command', '-')}`" +
          (f"; wall time {export['wall_s']:.0f} s (sweeps finished earlier are reused)." if export.get("wall_s") else ".")
          + "\n",
          "Zone rules: **raw** = the paper's rule on R_c^2 (the first cut after the largest relative drop between "
          "consecutive cuts); **scale-free** = the same rule on the within-class fraction R_c^2 / tr(Sigma), which a "
          "rescaling of the features leaves unchanged (an inverse network undoes such a rescaling, so a drop of R_c^2 "
          "that is only a shrinking of the features is no privacy); **MSE** = the cut after the largest jump of "
          "MSE / mean-image-baseline MSE between consecutive attacked cuts ('not localised' when cuts between the two "
          "were not attacked).\n"]
    # -- zones per seed -------------------------------------------------------------------------------------------
    md += ["## Zones per seed\n",
           "| form | seed | accuracy | zone, raw rule | zone, scale-free rule | zone by MSE | MSE jump into the raw zone "
           "(rank) | MSE jump into the scale-free zone (rank) | MSE matches |",
           "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for f in forms:
        for s in seeds:
            z = zones[f][s]
            sf = z.get("scale_free") or {}
            ch = z.get("checks", {})

            def jump(c):
                return f"{c['jump']:+.3f} ({c['jump_rank']})" if c and "jump" in c else "not attacked"
            match = [n for n in ("raw", "scale_free") if (ch.get(n) or {}).get("matches_mse")]
            md.append(f"| {f} | {s} | {res[f][s]['accuracy']:.4f} | {_zcut(z)}{_boot(z)} | {_zcut(sf)}{_boot(sf)} | "
                      f"{_mzone(z['mse'])} | {jump(ch.get('raw'))} | {jump(ch.get('scale_free'))} | "
                      f"{', '.join(match) or 'neither'} |")
            if z.get("disagreement"):
                notes.append(f"- {f} seed {s}: {z['disagreement']}.")
    md.append("")
    if notes:
        md += ["Where the rules disagree:\n"] + notes + [""]
    # -- every attacked cut's MSE with the baseline --------------------------------------------------------------
    acuts = sorted({row["cut"] for f in forms for s in seeds for row in res[f][s]["rows"] if row.get("mse") is not None})
    names = {row["cut"]: row["block"] for row in res[forms[0]][seeds[0]]["rows"]}
    recomputed = any(row.get("baseline_recomputed") for f in forms for s in seeds for row in res[f][s]["rows"])
    md += ["## Every attacked cut: MSE, the mean-image baseline, MSE / baseline\n",
           "Mean +- sample std over seeds (95% t interval of the mean). MSE / baseline is the fraction of the way from "
           "a perfect reconstruction (0) to the attacker that outputs the mean image of its data (1)."
           + (" The baselines were recomputed from each seed's data split at re-reading (`--baseline-from-data`; the "
              "run did not store them; the baseline does not depend on the model)." if recomputed else "") + "\n",
           "| form | " + " | ".join(f"cut {c} {names.get(c, '')}" for c in acuts) + " |", "|---|" + "---|" * len(acuts)]
    thr = paper_fidelity_threshold(3 if tree["data"]["name"] not in ("mnist", "fashion_mnist") else 1)
    for f in forms:
        cells = []
        for c in acuts:
            rows = [next(r for r in res[f][s]["rows"] if r["cut"] == c) for s in seeds]
            if any(r.get("mse") is None for r in rows):
                cells.append("-")
                continue
            m, sd, hw = mean_ci([r["mse"] for r in rows])
            fr = [mse_fraction(r) for r in rows]
            b = [r.get("baseline_mse") for r in rows]
            frac = f"{statistics.mean(fr):.3f}" if all(v is not None for v in fr) else "-"
            base = f"{statistics.mean(b):.4f}" if all(b) else "-"
            cells.append(f"{m:.4f} +- {sd:.4f} [{m - hw:.4f}, {m + hw:.4f}]; baseline {base}; **{frac}**")
        md.append(f"| {f} | " + " | ".join(cells) + " |")
    md.append("")
    md.append(f"High-fidelity reconstructions (MSE < {thr:.4g} per element, the paper's 0.02 summed over channels): "
              + "; ".join(f"{f}: " + ", ".join(str(max([r['cut'] for r in res[f][s]['rows'] if r.get('mse') is not None
                                                          and r['mse'] < thr], default='none')) for s in seeds)
                          for f in forms) + " (deepest such cut per seed).\n")
    if len(seeds) > 1 and len(forms) > 1:
        md += [f"MSE difference against {forms[0]} (Welch 95% interval over seeds):\n",
               "| form | " + " | ".join(f"cut {c}" for c in acuts) + " |", "|---|" + "---|" * len(acuts)]
        for f in forms[1:]:
            cells = []
            for c in acuts:
                a = [next(r for r in res[forms[0]][s]["rows"] if r["cut"] == c).get("mse") for s in seeds]
                b = [next(r for r in res[f][s]["rows"] if r["cut"] == c).get("mse") for s in seeds]
                if None in a or None in b:
                    cells.append("-")
                    continue
                dm, lo, hi = welch(a, b)
                cells.append(f"{dm:+.4f} [{lo:+.4f}, {hi:+.4f}] " +
                             ("higher" if lo > 0 else "lower" if hi < 0 else "within seed spread"))
            md.append(f"| {f} | " + " | ".join(cells) + " |")
        md.append("")
    # -- label smoothing on the scale-free probe ----------------------------------------------------------------
    md.append("## Label smoothing on the scale-free probe\n")
    ls = None
    if "onehot" in res and len(forms) > 1 and len(seeds) > 1:
        ls = label_smoothing_reading({f: [res[f][s]["rows"] for s in seeds] for f in forms})
        md.append(ls_reading_markdown(ls))
    else:
        md.append("Needs the one-hot form, another form and 2 or more seeds.\n")
    # -- per-form probe tables ---------------------------------------------------------------------------------
    for f in forms:
        accs = [res[f][s]["accuracy"] for s in seeds]
        md.append(f"## {f}: test accuracy {statistics.mean(accs):.4f} (seeds: {', '.join(f'{a:.4f}' for a in accs)})\n")
        md.append("| cut | block | R_c^2 per seed | tr(Sigma) per seed | within-class fraction per seed | marks per seed "
                  "(R raw, S scale-free, M MSE) |\n|---|---|---|---|---|---|")
        from splitveil.report.gpz import zone_marks
        first = res[f][seeds[0]]["rows"]
        for i, r0 in enumerate(first):
            rs = [res[f][s]["rows"][i] for s in seeds]
            rc = "; ".join(f"{r['rc2_mean']:.4g}" + (f" [{r['rc2_ci95'][0]:.4g}, {r['rc2_ci95'][1]:.4g}]"
                                                     if r.get("rc2_ci95") else "") for r in rs)
            tr = "; ".join(f"{r.get('total_variance', r['sigma2'] * r['d']):.4g}" +
                           (f" [{r['total_ci95'][0]:.4g}, {r['total_ci95'][1]:.4g}]" if r.get("total_ci95") else "")
                           for r in rs)
            fr = "; ".join(f"{r['within_fraction']:.4f}" + (f" [{r['frac_ci95'][0]:.4f}, {r['frac_ci95'][1]:.4f}]"
                                                             if r.get("frac_ci95") else "") for r in rs)
            marks = "; ".join(zone_marks(zones[f][s], r0["cut"]) or "-" for s in seeds)
            md.append(f"| {r0['cut']} | {r0['block']} | {rc} | {tr} | {fr} | {marks} |")
        md.append("")
    # -- the figure: seed means per form, the zones of the seed-mean profile of the first form --------------------
    series = []
    mean_rows = None
    for f in forms:
        first = res[f][seeds[0]]["rows"]
        mrows = []
        for i, r0 in enumerate(first):
            rs = [res[f][s]["rows"][i] for s in seeds]
            row = {"cut": r0["cut"], "block": r0["block"], "d": r0["d"],
                   "rc2_mean": statistics.mean(r["rc2_mean"] for r in rs),
                   "sigma2": statistics.mean(r["sigma2"] for r in rs),
                   "within_fraction": statistics.mean(r["within_fraction"] for r in rs)}
            row["total_variance"] = row["sigma2"] * row["d"]
            if all(r.get("mse") is not None and r.get("baseline_mse") for r in rs):
                row["mse"] = statistics.mean(r["mse"] for r in rs)
                row["baseline_mse"] = statistics.mean(r["baseline_mse"] for r in rs)
            mrows.append((row, rs))
        if mean_rows is None:
            mean_rows = [m for m, _ in mrows]

        def spread(key, rs, fn=lambda r, k: r[k]):
            v = [fn(r, key) for r in rs]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            return statistics.mean(v) - sd, statistics.mean(v) + sd
        tot = lambda r, k: r.get("total_variance", r["sigma2"] * r["d"])   # noqa: E731
        fr = [mse_fraction(m) for m, _ in mrows]
        series.append({"label": f, "cuts": [m["cut"] for m, _ in mrows], "names": {m["cut"]: m["block"] for m, _ in mrows},
                       "rc2": [m["rc2_mean"] for m, _ in mrows], "rc2_lo": [spread("rc2_mean", rs)[0] for _, rs in mrows],
                       "rc2_hi": [spread("rc2_mean", rs)[1] for _, rs in mrows],
                       "tr": [m["total_variance"] for m, _ in mrows],
                       "tr_lo": [spread("tr", rs, tot)[0] for _, rs in mrows],
                       "tr_hi": [spread("tr", rs, tot)[1] for _, rs in mrows],
                       "frac": [m["within_fraction"] for m, _ in mrows],
                       "frac_lo": [spread("within_fraction", rs)[0] for _, rs in mrows],
                       "frac_hi": [spread("within_fraction", rs)[1] for _, rs in mrows],
                       "mse_frac": fr, "err": f"+- sample std over {len(seeds)} seeds"})
    zm = detect_zone(mean_rows)
    plot_profiles(series, zone_spans(zm), out_dir / "gpz.png",
                  f"{tree['model']['name']} {tree['data']['name']}: seed means per label form; zones of the {forms[0]} "
                  "seed-mean profile", zm.get("disagreement"), None)
    md.append(f"Figure: `gpz.png` / `gpz.pdf` (seed means, bars +- seed std; shaded: the zones of the {forms[0]} "
              f"seed-mean profile: raw {_zcut(zm)}, scale-free {_zcut(zm.get('scale_free') or {})}, MSE "
              f"{_mzone(zm['mse'])}).")
    # -- reconstruction strips (only when the run folders are here) ----------------------------------------------
    import torch
    strips_done = []
    for f in forms:
        rec = res[f][seeds[0]].get("recon") or {}
        strips = {}
        for c, p in sorted(rec.items(), key=lambda kv: int(kv[0])):
            if Path(p).exists():
                strips[f"cut {c} {names.get(int(c), '')}"] = torch.load(p, weights_only=True)
        if strips:
            save_recon_strip(out_dir / f"gpz_recon_{f}.png", strips, f"{f} seed {seeds[0]}: reconstructions per cut")
            strips_done.append(f"`gpz_recon_{f}.png`")
    md.append(" Reconstruction strips (first seed; PNG at 300 dpi and PDF): " + ", ".join(strips_done) + "."
              if strips_done else " No reconstruction strips: the export's run folders are not on this machine.")
    text = "\n".join(md) + "\n"
    (out_dir / "gpz.md").write_text(text)
    if docs:
        write_docs_block(Path(docs), summary_block(export, zones, source, ls))
    return text


DOCS_START, DOCS_END = "<!-- gpz-benchmark:start (generated by benchmarks/gpz.py) -->", "<!-- gpz-benchmark:end -->"


def summary_block(export: dict, zones: dict, source: str, ls: dict | None) -> str:
    """The benchmark's short summary for docs/gpz.md: zones by each rule per seed, whether MSE matches each, and
    the label-smoothing verdicts (generated; never edited by hand)."""
    res = export["results"]
    seeds = list(next(iter(res.values())))
    lines = [source, "",
             "| form | accuracy (mean) | zone, raw rule (per seed) | zone, scale-free rule (per seed) | zone by MSE "
             "(per seed) | MSE matches (per seed) |", "|---|---|---|---|---|---|"]
    for f, per in res.items():
        acc = statistics.mean(per[s]["accuracy"] for s in seeds)
        z = [zones[f][s] for s in seeds]
        match = ["+".join(n for n in ("raw", "scale_free") if (zz.get("checks", {}).get(n) or {}).get("matches_mse"))
                 or "neither" for zz in z]
        lines.append(f"| {f} | {acc:.3f} | {'; '.join(_zcut(zz) for zz in z)} | "
                     f"{'; '.join(_zcut(zz.get('scale_free') or {}) for zz in z)} | "
                     f"{'; '.join(_mzone(zz['mse']) for zz in z)} | {'; '.join(match)} |")
    if ls:
        for f, r in ls["forms"].items():
            sub = "; ".join(f"cut {m['cut']} {m['diff'][0]:+.4f} [{m['diff'][1]:+.4f}, {m['diff'][2]:+.4f}] "
                            f"{m['verdict']}" for m in r["below_ceiling_mse"]) or "no attacked cut below the ceiling"
            lines.append(f"\n- {f} against {ls['base']}: {r['verdict'] or 'no verdict'} at cut {r['deepest_cut']} "
                         f"(R_c^2 x{r['per_cut'][-1]['rc2_ratio']:.2f}, tr(Sigma) x{r['per_cut'][-1]['tr_ratio']:.2f}, "
                         f"within-class fraction {r['per_cut'][-1]['frac_base']:.3f} -> "
                         f"{r['per_cut'][-1]['frac_form']:.3f}); MSE below {ls['ceiling']:.0%} of the baseline: {sub}.")
    return "\n".join(lines)


def write_docs_block(path: Path, block: str) -> None:
    """Replace the text between the generated-block markers of ``path`` (which must contain both)."""
    text = path.read_text()
    if DOCS_START not in text or DOCS_END not in text:
        raise SystemExit(f"{path}: no generated block ({DOCS_START} ... {DOCS_END})")
    head, rest = text.split(DOCS_START, 1)
    _, tail = rest.split(DOCS_END, 1)
    path.write_text(f"{head}{DOCS_START}\n{block}\n{DOCS_END}{tail}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="a run config file as the budget (e.g. configs/gpz_vgg19_cifar10.yaml)")
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--model", default="vgg19_bn")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--test-size", type=int, default=500)
    p.add_argument("--aux-size", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument("--attacks", default="{inverse_network: {}}",
                   help="the attack suite (YAML mapping); each attacked cut scores the worst case over it")
    p.add_argument("--attack-cuts", default="2,8-16", help="cuts to attack: a list with ranges, e.g. 2,8-16")
    p.add_argument("--forms", default="onehot,ls+0.3,ls-0.05")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--probe-images", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS), help="where gpz.md / gpz.json / gpz.png go (run folders: <out>/runs)")
    p.add_argument("--estimate", action="store_true", help="time one epoch of each stage; write <out>/gpz_estimate.json")
    p.add_argument("--from-json", help="re-read an export (gpz.json) instead of running: regenerate gpz.md / gpz.png")
    p.add_argument("--baseline-from-data", action="store_true",
                   help="with --from-json: recompute missing mean-image baselines from the export's data split")
    p.add_argument("--docs", default=None,
                   help="also write the summary into the generated block of this file (e.g. docs/gpz.md)")
    p.add_argument("--source-note", default=None, help="with --from-json: the provenance line at the top of gpz.md")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        export = json.loads(Path(args.from_json).read_text())
        export.setdefault("attack_cuts", ",".join(map(str, export.get("attack_cuts", []))))
        if isinstance(export["attack_cuts"], list):
            export["attack_cuts"] = ",".join(map(str, export["attack_cuts"]))
        if args.baseline_from_data and fill_baselines(export):   # kept in the export, each such row flagged
            Path(args.from_json).write_text(json.dumps(export, indent=1, default=str))
        source = args.source_note or (f"Re-read from the export `{args.from_json}` by `python benchmarks/gpz.py "
                                      + " ".join(sys.argv[1:]) + "`.")
        print(render(export, out_dir, source, args.docs))
        return 0
    tree = budget(args)
    if args.estimate:
        est = estimate(args, tree)
        est["budget"], est["attack_cuts"], est["forms"], est["seeds"] = tree, args.attack_cuts, args.forms, args.seeds
        (out_dir / "gpz_estimate.json").write_text(json.dumps(est, indent=1))
        print(json.dumps(est, indent=1))
        return 0
    export = run_sweeps(args, tree)
    (out_dir / "gpz.json").write_text(json.dumps(export, indent=1, default=str))
    print(render(export, out_dir, f"Measured {export['measured']} by this script (`gpz.json` is the export).",
                 args.docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
