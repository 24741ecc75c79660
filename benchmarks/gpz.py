"""GPZ benchmark on the CPU budget: CIFAR-10 subset, a reduced-width VGG19-BN, one-hot / LS+ 0.3 / LS- -0.05
with several seeds. Per (label form, seed): one trained model, the probe (class-mean R_c^2 with a bootstrap
interval) at every cut, the inverse-network attack at a few cuts, the zone by the paper's rule.

    nice -n 10 python benchmarks/gpz.py [--data-root ../shared/data] [--forms onehot] [--seeds 0,1,2]

Run it once per form (each piece under ~10 minutes on 2 cores) and then with all forms: finished sweeps are
reused from benchmarks/results/runs/, and the last call writes benchmarks/results/gpz.md and gpz.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def budget(args) -> dict:
    return {
        "name": "gpz_bench2", "seed": 0, "device": "cpu", "progress": False,
        "data": {"name": "cifar10", "root": args.data_root, "train_size": args.train_size, "test_size": 300,
                 "aux_size": args.aux_size},
        "model": {"name": args.model, "width": args.width, "cut": 1},
        "train": {"epochs": args.epochs, "batch_size": 128, "optimizer": "adam", "lr": 0.001, "weight_decay": 0.0,
                  "schedule": "cosine"},
        "defense": {"name": "none"},
        "attacks": {"inverse_network": {"epochs": args.attack_epochs, "batch_size": 64, "channels": 64}},
        "eval": {"recon_images": 8},
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--model", default="vgg19_bn")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--aux-size", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--attack-epochs", type=int, default=3)
    p.add_argument("--attack-cuts", default="2,8,15")
    p.add_argument("--forms", default="onehot,ls+0.3,ls-0.05")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--probe-images", type=int, default=300)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)

    import dataclasses

    from splitveil.experiments import config_from_dict
    from splitveil.experiments.gpz import GPZSweep, with_label_form
    from splitveil.report.gpz import write_sweep, zone_summary
    from splitveil.results.gpz import detect_zone

    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    tree = budget(args)
    cfg = config_from_dict(tree)
    t0 = time.time()
    res: dict[str, dict[int, dict]] = {}
    for form in forms:
        res[form] = {}
        for seed in seeds:
            sweep = GPZSweep(dataclasses.replace(cfg, defense=with_label_form(cfg.defense, form), seed=seed),
                             RESULTS / "runs", probe_images=args.probe_images)
            write_sweep(sweep.run(args.attack_cuts, attack=True))
            out = sweep.run("all", attack=False)
            write_sweep(out)
            stored = sweep.load_rows()
            rows = [stored[r["cut"]] for r in out["rows"]]
            res[form][seed] = {"accuracy": out["accuracy"], "rows": rows,
                               "zone": detect_zone(rows, channels=3), "run_dir": out["run_dir"]}
    wall = time.time() - t0
    d, t = tree["data"], tree["train"]
    md = [f"# GPZ benchmark ({args.model} x{args.width}, CIFAR-10 32x32, CPU)\n",
          f"Budget: {d['train_size']} train / {d['test_size']} test / {d['aux_size']} aux images, {t['epochs']} epochs "
          f"Adam 1e-3; inverse network {tree['attacks']['inverse_network']} at cuts {args.attack_cuts}; probe on "
          f"{args.probe_images} test images, 200 stratified bootstrap resamples. Forms {forms}, seeds {seeds}. "
          f"Wall time of this call {wall:.0f} s (sweeps finished earlier are reused). This budget is far below the "
          "paper's: accuracies are low and the numbers show the method, not the paper's result.\n"]
    for form in forms:
        accs = [r["accuracy"] for r in res[form].values()]
        md.append(f"## {form}: test accuracy {statistics.mean(accs):.4f} (seeds: {', '.join(f'{a:.4f}' for a in accs)})\n")
        for seed, r in res[form].items():
            md.append(f"- seed {seed}: {zone_summary(r['zone'])}")
        md.append("")
        first = next(iter(res[form].values()))["rows"]
        md.append("| cut | block | R_c^2 per seed [95% bootstrap CI] | MSE per seed (mean +- seed std) |\n|---|---|---|---|")
        for i, r0 in enumerate(first):
            rc = "; ".join(f"{r['rows'][i]['rc2_mean']:.4g} [{r['rows'][i]['rc2_ci95'][0]:.4g}, "
                           f"{r['rows'][i]['rc2_ci95'][1]:.4g}]" for r in res[form].values())
            ms = [r["rows"][i].get("mse") for r in res[form].values()]
            mtxt = "-" if any(m is None for m in ms) else (
                ", ".join(f"{m:.4f}" for m in ms) + f" ({statistics.mean(ms):.4f} +- "
                f"{statistics.stdev(ms) if len(ms) > 1 else 0.0:.4f})")
            md.append(f"| {r0['cut']} | {r0['block']} | {rc} | {mtxt} |")
        md.append("")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gpz.md").write_text("\n".join(md) + "\n")
    slim = {f: {s: {"accuracy": r["accuracy"], "zone": r["zone"],
                    "rows": [{k: v for k, v in row.items() if k != "rc2_boot"} for row in r["rows"]]}
                for s, r in per.items()} for f, per in res.items()}
    (RESULTS / "gpz.json").write_text(json.dumps(slim, indent=1, default=str))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
