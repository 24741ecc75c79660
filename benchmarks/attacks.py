"""Attack-suite benchmark (issue 5): every attack against the same target models.

CIFAR-10 on the CPU budget of ``configs/cifar10_vgg11_cpu.yaml`` (override any field with ``--set``),
undefended and with Gaussian noise at two levels, at a shallow and a deep cut. Each target model is trained
once per (cut, noise) and attacked by all attacks on the same transmitted test features; the table reports
test MSE / PSNR / SSIM and fit time, next to the mean-aux-image baseline, and one reconstruction grid per
(cut, noise) shows every attack's row.

    python benchmarks/attacks.py                                   # the full CPU budget (hours on 2 cores)
    python benchmarks/attacks.py --set data.train_size=2000 --set train.epochs=2 --attack-epochs 3   # reduced

Results: benchmarks/results/attacks.{csv,md} and benchmarks/results/attacks_<cut>_sigma<s>.png
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
from pathlib import Path

import torch

from splitveil.attacks import ATTACKS, mean_image_baseline
from splitveil.experiments import load_config
from splitveil.experiments import pipeline
from splitveil.models import ModelConfig, build_split_model
from splitveil.params import coerce
from splitveil.results.figures import save_recon_grid
from splitveil.utils import resolve_device, seed_everything

ROOT = Path(__file__).resolve().parents[1]


def attack_params(epochs: int, channels: int, rmle_steps: int, n_critic: int) -> dict[str, dict]:
    dec = {"epochs": epochs, "batch_size": 64, "channels": channels}
    return {
        "inverse_network": dec,
        "inverse_network_plus": {**dec},
        "gan": {**dec, "n_critic": n_critic},
        "rmle": {"steps": rmle_steps},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "cifar10_vgg11_cpu.yaml"))
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--set", action="append", default=[], help="config override FIELD=VALUE (repeatable)")
    ap.add_argument("--cuts", default="conv2,conv4", help="shallow,deep cut (block names)")
    ap.add_argument("--sigmas", default="0,0.1,0.5", help="Gaussian noise levels (0 = undefended)")
    ap.add_argument("--attacks", default=",".join(["inverse_network", "inverse_network_plus", "gan", "rmle"]))
    ap.add_argument("--attack-epochs", type=int, default=10)
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--rmle-steps", type=int, default=500)
    ap.add_argument("--n-critic", type=int, default=5)
    ap.add_argument("--attack-set", action="append", default=[], help="ATTACK.FIELD=VALUE extra attack parameter")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 is several times faster than 2 on a shared, loaded 2-core machine)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_config(args.config, [f"data.root={args.data_root}", *args.set])
    device = resolve_device(cfg.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    params = attack_params(args.attack_epochs, args.channels, args.rmle_steps, args.n_critic)
    for item in args.attack_set:
        key, value = item.split("=", 1)
        name, field = key.split(".", 1)
        params[name][field] = json.loads(value) if value[:1] in "0123456789-[{tfn" else value
    names = [a for a in args.attacks.split(",") if a]
    specs = {name: coerce(ATTACKS.get(name).Params, params[name], f"attacks.{name}") for name in names}
    seeds = pipeline.Seeds(cfg.seed)
    data, _ = pipeline.prepare_data(cfg, seeds)
    baseline = mean_image_baseline(data)
    print(f"data {data.name}: train {len(data.train)} test {len(data.test)} aux {len(data.aux)}; "
          f"mean-aux-image baseline mse {baseline['mse']:.4f}", flush=True)
    rows = []
    for sigma in [float(s) for s in args.sigmas.split(",")]:   # noise outer: partial results cover both cuts
        for cut in args.cuts.split(","):
            # the run pipeline's stages, the data built once for every (noise, cut)
            seed_everything(seeds.global_)
            point = dataclasses.replace(cfg, model=coerce(ModelConfig, {**vars(cfg.model), "cut": cut}),
                                        defense={"name": "gaussian_noise", "sigma": sigma} if sigma > 0 else {"name": "none"})
            model = build_split_model(point.model, data.num_classes, data.image_shape)
            prep = pipeline.Prepared(data, model, pipeline.prepare_defenses(point, model, data, device), device, seeds)
            trained = pipeline.train(point, prep)
            acc = trained.accuracy
            edge = pipeline.freeze_edge(model.encoder, prep.defenses)
            print(f"cut {cut} {tuple(model.feature_shape)} sigma {sigma}: accuracy {acc:.4f} "
                  f"(trained {trained.train_s:.0f} s)", flush=True)

            def on_result(name, res, x01, x_hat, cut=cut, sigma=sigma, acc=acc, model=model):
                rows.append({"cut": cut, "feature_shape": "x".join(map(str, model.feature_shape)), "sigma": sigma,
                             "accuracy": acc, "attack": name, "mse": res["mse"], "psnr": res["psnr"], "ssim": res["ssim"],
                             "fit_s": res["fit_seconds"], "invert_s": res["invert_seconds"],
                             "baseline_mse": baseline["mse"]})
                print(f"  {name:22s} mse {res['mse']:.4f} psnr {res['psnr']:.2f} ssim {res['ssim']:.4f} "
                      f"fit {res['fit_seconds']:.0f} s invert {res['invert_seconds']:.0f} s", flush=True)
                write(rows, out, args, cfg)

            outcome = pipeline.attack_all(specs, edge, data, seeds, device, show_progress=cfg.progress, n_show=8,
                                          on_result=on_result)
            save_recon_grid(out / f"attacks_{cut}_sigma{sigma:g}.png", outcome.originals, outcome.recon,
                            f"{data.name} {cfg.model.name} cut={cut} sigma={sigma:g} acc={acc:.3f}")


def write(rows: list[dict], out: Path, args, cfg) -> None:
    with open(out / "attacks.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"# Attack benchmark ({cfg.data.name}, {cfg.model.name} x{cfg.model.width}, train {cfg.data.train_size}, "
             f"test {cfg.data.test_size}, aux {cfg.data.aux_size}, {cfg.train.epochs} training epochs; attack epochs "
             f"{args.attack_epochs}, rmle steps {args.rmle_steps})", "",
             "| cut | z shape | sigma | accuracy | attack | MSE | PSNR | SSIM | fit s | invert s | mean-image MSE |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['cut']} | {r['feature_shape']} | {r['sigma']:g} | {r['accuracy']:.3f} | {r['attack']} | "
                     f"{r['mse']:.4f} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['fit_s']:.0f} | {r['invert_s']:.0f} | "
                     f"{r['baseline_mse']:.4f} |")
    (out / "attacks.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
