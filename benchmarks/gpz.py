"""GPZ benchmark on the CPU budget: CIFAR-10 subset, VGG11-BN (x0.5), a few epochs; the full sweep (every cut,
inverse-network attack at each) for one-hot training, then the same with label smoothing alpha = 0.3.

    nice -n 10 python benchmarks/gpz.py [--data-root ../shared/data] [--model vgg11_bn] [--quick]

Writes benchmarks/results/gpz.md and gpz.csv (the per-cut tables of both label forms, the zones and the
deepest-cut comparison); the sweep folders (checkpoints, plots, reconstruction strips) go to
benchmarks/results/runs/ and are reused when the script is run again (finished cuts are kept).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def budget(args) -> dict:
    q = args.quick
    return {
        "name": "gpz_bench", "seed": 0, "device": "auto", "progress": False,
        "data": {"name": "cifar10", "root": args.data_root, "train_size": 2000 if q else args.train_size,
                 "test_size": 200 if q else 500, "aux_size": 1000 if q else args.aux_size},
        "model": {"name": args.model, "width": args.width, "cut": 1},
        "train": {"epochs": 1 if q else args.epochs, "batch_size": 128, "optimizer": "adam", "lr": 0.001,
                  "weight_decay": 0.0, "schedule": "cosine"},
        "defense": {"name": "none"},
        "attacks": {"inverse_network": {"epochs": 1 if q else args.attack_epochs, "batch_size": 64,
                                        "channels": args.attack_channels}},
        "eval": {"recon_images": 8},
    }


def wait_for_label_smoothing(timeout_s: float = 1800) -> None:
    """Label smoothing is its own defense module; wait for it rather than re-implementing it."""
    from splitveil.defenses import DEFENSES

    t0 = time.time()
    while "label_smoothing" not in DEFENSES:
        try:
            importlib.import_module("splitveil.defenses.label_smoothing")
        except ModuleNotFoundError:
            if time.time() - t0 > timeout_s:
                raise SystemExit("defenses/label_smoothing.py did not appear; cannot compare label forms")
            print("waiting for defenses/label_smoothing.py ...", flush=True)
            time.sleep(30)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--model", default="vgg11_bn")
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--train-size", type=int, default=4000)
    p.add_argument("--aux-size", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--attack-epochs", type=int, default=4)
    p.add_argument("--attack-channels", type=int, default=32)
    p.add_argument("--forms", default="onehot,ls+0.3")
    p.add_argument("--attack-cuts", default="all",
                   help="cuts attacked for the forms after the first (others: probe only), e.g. 6,7,8; default all")
    p.add_argument("--quick", action="store_true", help="a tiny smoke budget")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)

    import dataclasses

    from splitveil.experiments import config_from_dict
    from splitveil.experiments.gpz import GPZSweep, csv_text, label_form_defense, markdown_table, zone_summary
    from splitveil.report.gpz_plots import plot_compare

    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    if any(f.startswith("ls") for f in forms):
        wait_for_label_smoothing()
    tree = budget(args)
    cfg = config_from_dict(tree)
    t0 = time.time()
    results = {}
    for i, form in enumerate(forms):
        sweep = GPZSweep(dataclasses.replace(cfg, defense=label_form_defense(form)), RESULTS / "runs", probe_images=500)
        if i == 0 or args.attack_cuts == "all":
            results[form] = sweep.run("all", attack=True)
        else:   # reduced budget: probe every cut, attack only ``--attack-cuts``
            sweep.run(args.attack_cuts, attack=True)
            res = sweep.run("all", attack=False)
            stored = sweep.load_rows()
            res["rows"] = [stored[r["cut"]] for r in res["rows"]]
            from splitveil.experiments.gpz import detect_zone
            res["zone"] = detect_zone(res["rows"])
            results[form] = res
    wall = time.time() - t0
    d, t = tree["data"], tree["train"]
    md = [f"# GPZ benchmark ({args.model} x{args.width}, CIFAR-10)\n",
          f"Budget: {d['train_size']} train / {d['test_size']} test / {d['aux_size']} aux images, {t['epochs']} epochs "
          f"Adam 1e-3; inverse network {tree['attacks']['inverse_network']} per cut; probe on 500 test images "
          f"(or all if fewer). Attacked cuts for forms after the first: {args.attack_cuts}. "
          f"Wall time {wall:.0f} s (cuts finished earlier are reused).\n"]
    csv_parts = []
    for form, r in results.items():
        md.append(f"## {form}: test accuracy {r['accuracy']:.4f}\n\n{markdown_table(r['rows'], r['zone'])}\n\n"
                  f"{zone_summary(r['zone'])}\n\nsweep folder: {r['run_dir']}\n")
        body = csv_text(r["rows"], r["zone"]).splitlines()
        csv_parts += ([("label_form," + body[0])] if not csv_parts else []) + [f"{form},{line}" for line in body[1:]]
    if len(results) >= 2:
        names = list(results)
        a, b = results[names[0]]["rows"], results[names[-1]]["rows"]
        fm = lambda v: "-" if v is None else f"{v:.4f}"
        lines = [f"\n## deepest cuts: {names[0]} vs {names[-1]}\n",
                 "| cut | block | R_c^2 " + names[0] + " | R_c^2 " + names[-1] + " | within " + names[0] + " | within "
                 + names[-1] + " | MSE " + names[0] + " | MSE " + names[-1] + " |", "|---|---|---|---|---|---|---|---|"]
        for ra, rb in list(zip(a, b))[-3:]:
            lines.append(f"| {ra['cut']} | {ra['block']} | {ra['rc2_mean']:.4g} | {rb['rc2_mean']:.4g} | "
                         f"{ra['within_fraction']:.4f} | {rb['within_fraction']:.4f} | {fm(ra.get('mse'))} | {fm(rb.get('mse'))} |")
        md += lines
        plot_compare({f: (r["rows"], r["zone"]) for f, r in results.items()}, RESULTS / "gpz_compare.png",
                     f"{args.model}: label forms")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gpz.md").write_text("\n".join(md) + "\n")
    (RESULTS / "gpz.csv").write_text("\n".join(csv_parts) + "\n")
    print("\n".join(md))
    print(f"\nwritten {RESULTS / 'gpz.md'} and {RESULTS / 'gpz.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
