"""Benchmark: every baseline defense under one threat model (issue 3).

Each defense is trained on the budget of ``configs/cifar10_vgg11_cpu.yaml`` (same data, seed, model, cut,
attack and budget for all), then attacked; the table reports test accuracy, the inverse-network attack's
MSE / PSNR / SSIM, the encoder's FLOPs per image and the training time.

    nice -n 10 python benchmarks/defenses.py                         # full CPU budget of the config
    nice -n 10 python benchmarks/defenses.py --set train.epochs=3 --set data.train_size=4000   # reduced
    python benchmarks/defenses.py --only none,dropout --data-root ../shared/data

Writes ``benchmarks/results/defenses.csv`` and ``benchmarks/results/defenses.md`` (rows are appended to the
table as runs finish; finished runs are reused from ``benchmarks/results/defenses_runs/`` when re-run).
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (row label, overrides on top of the config). Parameter choices: the usual settings of the literature's
# comparisons, not tuned to this budget.
DEFENSES: list[tuple[str, dict]] = [
    ("none", {"defense.name": "none"}),
    ("dropout", {"defense.name": "dropout", "defense.rate": 0.5}),
    ("nopeek", {"defense.name": "nopeek", "defense.alpha": 0.5}),
    ("patrol", {"defense.name": "patrol", "defense.amount": 0.5, "defense.prune_epoch": "half"}),
    ("noise_arl", {"defense.name": "[gaussian_noise, noise_arl]", "defense.sigma": 0.1,
                   "defense.noise_arl.weight": 1.0, "defense.noise_arl.pretrain_epochs": 1}),
    ("gaussian_noise", {"defense.name": "gaussian_noise", "defense.sigma": 0.1}),
    ("label_smoothing", {"defense.name": "label_smoothing", "defense.alpha": 0.1}),
    ("topk_prune", {"defense.name": "topk_prune", "defense.fraction": 0.5}),
    ("bottleneck4", {"defense.name": "none", "model.bottleneck_channels": 4}),
]

COLUMNS = ["defense", "accuracy", "attack_mse", "attack_psnr", "attack_ssim", "encoder_flops", "train_s",
           "total_s", "epochs", "train_size", "attack_epochs", "details"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "cifar10_vgg11_cpu.yaml"))
    ap.add_argument("--data-root", default=None, help="data folder (default: the config's)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override applied to every defense's run (e.g. a reduced budget)")
    ap.add_argument("--only", default=None, help="comma-separated row labels to run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--device", default=None)
    return ap.parse_args(argv)


def details(m) -> str:
    """Defense facts worth a table cell (``m``: the run's RunRecord)."""
    info = m.defense_info or {}
    p = info.get("patrol")
    parts = []
    if p:
        parts.append(f"channels {p['total_channels_before']}->{p['total_channels_after']}, "
                     f"FLOPs {p['encoder_flops_before']}->{p['encoder_flops_after']}")
    a = info.get("noise_arl")
    if a and a.get("decoder_mse_per_epoch"):
        parts.append("sim. decoder MSE/epoch " + "/".join(f"{v:.4f}" for v in a["decoder_mse_per_epoch"]))
    return "; ".join(parts)


def write_tables(rows: list[dict], out: Path, note: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "defenses.csv", "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(rows)
    lines = [f"# Baseline defenses ({note})", "",
             "| defense | accuracy | attack MSE | PSNR (dB) | SSIM | encoder MFLOPs | train s | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['defense']} | {r['accuracy']:.4f} | {r['attack_mse']:.4f} | {r['attack_psnr']:.2f} | "
                     f"{r['attack_ssim']:.4f} | {r['encoder_flops'] / 1e6:.2f} | {r['train_s']:.0f} | {r['details']} |")
    (out / "defenses.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    from splitveil.experiments import load_config
    from splitveil.experiments.run import run_experiment
    from splitveil.results import RunRecord

    args = parse_args(argv)
    out = Path(args.out)
    only = set(args.only.split(",")) if args.only else None
    base = load_config(args.config, list(args.set))
    rows = []
    for label, over in DEFENSES:
        if only and label not in only:
            continue
        over = dict(over)
        if over.get("defense.prune_epoch") == "half":
            over["defense.prune_epoch"] = max(1, base.train.epochs // 2)
        sets = list(args.set) + [f"{k}={v}" for k, v in over.items()] + ["progress=false"]
        if args.data_root:
            sets.append(f"data.root={args.data_root}")
        if args.device:
            sets.append(f"device={args.device}")
        cfg = load_config(args.config, sets)
        t0 = time.perf_counter()
        m = RunRecord.from_dict(run_experiment(cfg, out / "defenses_runs"))
        att = m.attacks["inverse_network"]
        row = {"defense": label, "accuracy": m.accuracy, "attack_mse": att.mse, "attack_psnr": att.psnr,
               "attack_ssim": att.ssim, "encoder_flops": m.cost.encoder_flops,
               "train_s": m.timings["train_s"], "total_s": m.timings["total_s"], "epochs": cfg.train.epochs,
               "train_size": cfg.data.train_size, "attack_epochs": cfg.attacks["inverse_network"].get("epochs"),
               "details": details(m)}
        rows.append(row)
        print(f"{label:16s} acc {row['accuracy']:.4f}  mse {row['attack_mse']:.4f}  psnr {row['attack_psnr']:.2f}  "
              f"ssim {row['attack_ssim']:.4f}  flops {row['encoder_flops']}  train {row['train_s']:.0f}s  "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
        note = (f"{Path(args.config).name}, seed {cfg.seed}, {cfg.train.epochs} epochs, {cfg.data.train_size} train "
                f"images, attack inverse_network {cfg.attacks['inverse_network'].get('epochs')} epochs"
                + (f"; overrides {' '.join(args.set)}" if args.set else ""))
        write_tables(rows, out, note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
