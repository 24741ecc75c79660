"""Benchmark: privacy-utility trade-off of the CEM variants (issues 4 and 11).

On the CEM reference setup at the CIFAR-10 CPU budget (``configs/cifar10_vgg11_cem_cpu.yaml``: reference
bottleneck + sigmoid, SGD with the scaled step schedule), trains noise only and every CEM variant
(``[gaussian_noise, <cem>]``, each with its defaults otherwise) at each sigma in ``--sigmas`` and lambda in
``--lambdas``, attacks each with the config's inverse network, and reports test accuracy next to the attack's
MSE (higher MSE at equal accuracy is better) and the feature diagnostics (``snr`` = std(z) / sigma and the
scale-free between/within class ratio: a lower snr at an unchanged ratio is shrinking, not contraction).
Noise only is ``cem_gmm`` at lambda 0 (no term, no refit; it records the same diagnostics). All runs share
data, seed, model, cut, attack and budget.

    nice -n 10 python benchmarks/cem_tradeoff.py                        # full config budget
    nice -n 10 python benchmarks/cem_tradeoff.py --sigmas 0.025 --lambdas 16 \
        --set data.train_size=2000 --set train.epochs=3 --set attacks.inverse_network.epochs=3   # reduced

Writes ``benchmarks/results/cem_tradeoff.{csv,md}`` (rows appended as runs finish; finished runs are reused from
``benchmarks/results/cem_tradeoff_runs/``) and ``cem_tradeoff.png`` (accuracy vs attack MSE).
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CEM = ["cem_gmm", "cem_slot_cross", "cem_gated_pool"]
COLUMNS = ["defense", "sigma", "lambda", "seed", "accuracy", "attack_mse", "attack_psnr", "attack_ssim",
           "snr", "between_within", "final_L_C", "train_s", "epochs", "train_size"]


def grid(sigmas: list[float], lambdas: list[float], variants: list[str]):
    """Noise only first, then lambda by lambda every variant (a cut-short run still covers every variant)."""
    for s in sigmas:
        yield "noise only", s, None, {"defense": {"name": ["gaussian_noise", "cem_gmm"], "sigma": s, "lambda": 0}}
    for s in sigmas:
        for lam in lambdas:
            for v in variants:
                yield v, s, lam, {"defense": {"name": ["gaussian_noise", v], "sigma": s, "lambda": lam}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "cifar10_vgg11_cem_cpu.yaml"))
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--sigmas", default="0.025,0.05")
    ap.add_argument("--lambdas", default="16")
    ap.add_argument("--variants", default=",".join(CEM))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override for every run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)

    from splitveil import load_config
    from splitveil.experiments.run import run_experiment

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, sigma, lam, over in grid([float(s) for s in args.sigmas.split(",")],
                                        [float(v) for v in args.lambdas.split(",")], args.variants.split(",")):
        import json

        sets = [f"{k}={json.dumps(v)}" for k, v in over.items()] + [f"seed={args.seed}", "progress=false"] + args.set
        if args.data_root:
            sets.append(f"data.root={args.data_root}")
        cfg = load_config(args.config, sets)
        m = run_experiment(cfg, out / "cem_tradeoff_runs")
        att = m["attacks"]["inverse_network"]
        hist = m["history"][-1] if m["history"] else {}
        lc = next((v for k, v in hist.items() if k.endswith(".L_C")), "")
        diag = next(iter(m.get("defense_diagnostics", {}).values()), {})
        rows.append({"defense": label, "sigma": sigma, "lambda": "" if lam is None else lam, "seed": args.seed,
                     "accuracy": round(m["accuracy"], 4), "attack_mse": round(att["mse"], 5),
                     "attack_psnr": round(att["psnr"], 2), "attack_ssim": round(att["ssim"], 4),
                     "snr": round(diag.get("snr", float("nan")), 3),
                     "between_within": round(diag.get("between_within_ratio", float("nan")), 3),
                     "final_L_C": round(lc, 4) if lc != "" else "", "train_s": round(m["timings"]["train_s"], 1),
                     "epochs": cfg.train.epochs, "train_size": cfg.data.train_size})
        print(rows[-1], flush=True)
        write(rows, out, args)
    plot(rows, out / "cem_tradeoff.png")


def write(rows, out: Path, args) -> None:
    with open(out / "cem_tradeoff.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    note = f"\nconfig {Path(args.config).name}, overrides: {args.set or 'none'}; attack: the config's inverse_network.\n"
    (out / "cem_tradeoff.md").write_text("\n".join(lines) + "\n" + note)


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    markers = {"noise only": "o", "cem_gmm": "s", "cem_slot_cross": "^", "cem_gated_pool": "D"}
    for label in markers:
        pts = [r for r in rows if r["defense"] == label]
        if not pts:
            continue
        ax.scatter([r["attack_mse"] for r in pts], [r["accuracy"] for r in pts], marker=markers[label], label=label)
        for r in pts:
            tag = f"s{r['sigma']}" + (f" l{r['lambda']}" if r["lambda"] != "" else "")
            ax.annotate(tag, (r["attack_mse"], r["accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("inverse-network attack MSE (higher = more private)")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
