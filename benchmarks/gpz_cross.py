"""Cross-dataset attackers (issue 16, the GPZ paper's prior experiment): one victim per dataset (MNIST and
Fashion-MNIST), attacked at a shallow and a deep cut by an inverse network fitted on aux images of the victim's
own dataset and, separately, of the other dataset. Same victim model, same test images, same attack budget; only
the attacker's prior changes.

Per (victim, cut, prior): the attack MSE against the true inputs, and how close each reconstruction is to its
nearest image of the attacker's aux set (mean over test images of min_j MSE(x_hat, aux_j)). "Closer to the prior
than to the input" (nearest-aux MSE below the input MSE) is the paper's observation that reconstructions after
the GPZ reflect the attacker's prior rather than the private input. A reconstruction grid per victim shows the
inputs, then one row per (cut, prior).

    python benchmarks/gpz_cross.py [--data-root ../shared/data] [--fashion-root /usr/share/datasets] [--threads 1]
    python benchmarks/gpz_cross.py --from-json benchmarks/results/gpz_cross.json     # regenerate gpz_cross.md

Per cut it also records the probe (R_c^2, tr(Sigma), the scale-free within-class fraction R_c^2 / tr(Sigma)) and
per attack MSE / mean-image baseline. Writes <out>/gpz_cross.md (generated from the export), gpz_cross.json and
gpz_cross_<victim>.png + .pdf (300 dpi) (default out: benchmarks/results); the
trained victims are kept under <out>/runs and reused.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OTHER = {"mnist": "fashion_mnist", "fashion_mnist": "mnist"}


def tree(args, victim: str) -> dict:
    return {
        "name": "gpz_cross", "seed": args.seed, "device": "cpu", "progress": False, "threads": args.threads,
        "data": {"name": victim, "root": args.root[victim], "train_size": args.train_size, "test_size": args.test_size,
                 "aux_size": args.aux_size},
        "model": {"name": "vgg11_bn", "width": 0.5, "cut": 1},
        "train": {"epochs": args.epochs, "batch_size": 128, "optimizer": "adam", "lr": 0.001, "weight_decay": 0.0,
                  "schedule": "cosine"},
        "defense": {"name": "none"},
        "attacks": {"inverse_network": {}},
        "eval": {"recon_images": 8},
    }


def nearest_mse(x_hat: torch.Tensor, bank: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Per reconstruction (N x C x H x W in [0, 1]), the per-element MSE to its nearest image of ``bank``."""
    b = bank.flatten(1).float()
    bn = (b * b).sum(1)
    out = []
    for xs in x_hat.flatten(1).float().split(chunk):
        d = (xs * xs).sum(1, keepdim=True) + bn[None] - 2 * xs @ b.T
        out.append(d.clamp_min(0).min(1).values / b.shape[1])
    return torch.cat(out)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"), help="MNIST's data root")
    p.add_argument("--fashion-root", default="/usr/share/datasets", help="Fashion-MNIST's data root")
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--test-size", type=int, default=500)
    p.add_argument("--aux-size", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--cuts", default="conv2,conv7", help="a shallow and a deep cut of vgg11_bn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--from-json", help="re-read an export (gpz_cross.json): regenerate gpz_cross.md only")
    args = p.parse_args()
    if args.from_json:
        text = render(json.loads(Path(args.from_json).read_text()),
                      f"Re-read from the export `{args.from_json}` by `python benchmarks/gpz_cross.py "
                      + " ".join(sys.argv[1:]) + "`; the numbers are from the run that wrote it.")
        (Path(args.out) / "gpz_cross.md").write_text(text)
        print(text)
        return 0
    args.root = {"mnist": args.data_root, "fashion_mnist": args.fashion_root}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)

    from splitveil.data.build import build_data
    from splitveil.experiments import config_from_dict, pipeline
    from splitveil.experiments.gpz import GPZSweep, parse_cuts
    from splitveil.report.gpz_plots import save
    from splitveil.results.figures import image_grid

    out_dir = Path(args.out)
    t0 = time.time()
    rows, md = [], []
    for victim, other in OTHER.items():
        cfg = config_from_dict(tree(args, victim))
        sweep = GPZSweep(cfg, out_dir / "runs", probe_images=args.test_size).prepare()
        data = sweep.data
        # the other dataset's training images at the victim's size and channels (aux_size of them, seeded)
        other_aux = build_data(dataclasses.replace(cfg.data, aux={"name": other, "root": args.root[other]}),
                               cfg.seed).aux
        priors = {victim: data.aux, other: other_aux}
        specs = cfg.attack_params()
        grid: dict[str, torch.Tensor] = {}
        originals = None
        for k in parse_cuts(args.cuts, sweep.block_names):
            block = sweep.block_names[k - 1]
            probe = sweep.probe(k)     # R_c^2, tr(Sigma) and the scale-free within-class fraction at this cut
            for prior, aux in priors.items():
                work = out_dir / "runs" / f"cross-{victim}-{block}-{prior}"
                work.mkdir(parents=True, exist_ok=True)
                res = pipeline.attack_all(specs, sweep.edge(k), dataclasses.replace(data, aux=aux), sweep.seeds,
                                          sweep.device, workdir=work, n_show=len(data.test))
                name = next(iter(res.attacks))
                x01, x_hat = res.originals, res.recon[name]
                to_input = ((x_hat - x01) ** 2).flatten(1).mean(1)
                bank = aux.images.float() / 255.0
                to_prior = nearest_mse(x_hat, bank)
                closer = float((to_prior < to_input).float().mean())
                row = {"victim": victim, "cut": k, "block": block, "prior": prior, "accuracy": sweep.accuracy,
                       "mse": res.attacks[name].mse, "mse_check": float(to_input.mean()),
                       "nearest_prior_mse": float(to_prior.mean()), "closer_to_prior_share": closer,
                       "baseline_mse": res.worst_case.baseline_mse if res.worst_case else None,
                       "weak": bool(res.worst_case and res.worst_case.weak_attacks),
                       **{key: probe[key] for key in ("rc2_mean", "rc2_ci95", "total_variance", "total_ci95",
                                                      "within_fraction", "frac_ci95")}}
                rows.append(row)
                print(f"[cross] {victim} {block} prior {prior}: mse {row['mse']:.4f} nearest-prior "
                      f"{row['nearest_prior_mse']:.4f} closer-to-prior {closer:.0%} ({time.time() - t0:.0f} s)",
                      flush=True)
                originals = x01[:8]
                grid[f"{block}, attacker on {prior}"] = x_hat[:8]
        fig = image_grid([("original", originals), *grid.items()], n=originals.shape[0])
        save(fig, out_dir / f"gpz_cross_{victim}.png",
             f"victim {victim} (vgg11_bn x0.5, accuracy {sweep.accuracy:.3f}): inverse network by prior")
    wall = time.time() - t0
    argd = {k: v for k, v in vars(args).items() if k != "from_json"}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpz_cross.json").write_text(json.dumps({"args": argd, "rows": rows, "wall_s": wall,
                                                        "command": "python benchmarks/gpz_cross.py "
                                                                   + " ".join(sys.argv[1:])}, indent=1, default=str))
    text = render(json.loads((out_dir / "gpz_cross.json").read_text()))
    (out_dir / "gpz_cross.md").write_text(text)
    print(text)
    return 0


def render(export: dict, source: str | None = None) -> str:
    """gpz_cross.md from the export: per (victim, cut, prior) the MSE, the mean-image baseline, MSE / baseline (the
    fraction of the way from a perfect reconstruction to the baseline) and, where the export holds them, the probe
    at the cut (R_c^2, tr(Sigma) and the scale-free within-class fraction R_c^2 / tr(Sigma))."""
    a, rows = export["args"], export["rows"]
    probe = all("within_fraction" in r for r in rows)
    md = ["# Cross-dataset attackers (GPZ paper's prior experiment), CPU budget\n"]
    if source:
        md.append(source + "\n")
    wall = f"; wall time {export['wall_s']:.0f} s" if export.get("wall_s") else ""
    md.append(f"Victim: vgg11_bn x0.5 trained on {a['train_size']} images of its dataset, {a['epochs']} epochs Adam "
              f"1e-3, seed {a['seed']}; attack: inverse network at its default budget, fitted on {a['aux_size']} "
              f"aux images of the victim's own dataset or of the other one (same victim, same {a['test_size']} test "
              f"images). {a['threads']} thread(s){wall}. Per-element MSE on [0, 1] images. MSE / baseline: the "
              "fraction of the way from a perfect reconstruction (0) to the mean image of the attacker's data (1).\n")
    md.append(f"Command: `{export['command']}`\n" if export.get("command") else
              "Command: not recorded in this export (docs/gpz.md gives `python benchmarks/gpz_cross.py --threads 1`).\n")
    head = ["victim (accuracy)", "cut", "attacker's prior", "MSE to the input", "mean-image baseline MSE",
            "MSE / baseline", "MSE to the nearest prior image", "reconstructions closer to a prior image than to the input"]
    if probe:
        head += ["R_c^2", "tr(Sigma)", "within-class fraction [95% CI]"]
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['victim']} ({r['accuracy']:.3f})", f"{r['cut']} {r['block']}",
                 r["prior"] + (" (own)" if r["prior"] == r["victim"] else " (other)"),
                 f"{r['mse']:.4f}" + (" (weak: not below baseline)" if r["weak"] else ""), f"{r['baseline_mse']:.4f}",
                 f"{r['mse'] / r['baseline_mse']:.3f}", f"{r['nearest_prior_mse']:.4f}", f"{r['closer_to_prior_share']:.0%}"]
        if probe:
            ci = r.get("frac_ci95")
            cells += [f"{r['rc2_mean']:.4g}", f"{r['total_variance']:.4g}",
                      f"{r['within_fraction']:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")]
        md.append("| " + " | ".join(cells) + " |")
    md.append("")
    if not probe:
        md.append("This export holds no probe values (no R_c^2 or tr(Sigma) per cut): the scale-free within-class "
                  "fraction cannot be read from it; a rerun of the script records it.\n")
    md.append("Grids: " + ", ".join(f"`gpz_cross_{v}.png`" for v in OTHER) + " (top row: inputs; then one row per "
              "cut and prior).")
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    sys.exit(main())
