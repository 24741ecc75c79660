"""Probe: how the slot surrogate's tanh gate (alpha_attn) moves when only its own fitting term trains it
(``surrogate_update: fit``, the default), issue 25.

Synthetic sigmoid features shaped like ``configs/cifar10_vgg11_cem_cpu.yaml``'s transmitted features (512 values in
(0, 1), 10 classes x 5 modes, batch 128); the defense's own loss (fit + L_C) drives its parameters with the
trainer's optimiser (SGD lr 0.05, momentum 0.9, weight decay 5e-4). The features are fixed (no encoder), so
this isolates the surrogate's learning. Reports alpha_attn, tanh(alpha_attn) and d loss / d alpha_attn every 50
steps, for each (gate_init, fit_weight).

    OMP_NUM_THREADS=1 nice -n 15 python benchmarks/cem_gate_probe.py

Writes ``benchmarks/results/cem_gate_probe.md``.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from splitveil.defenses import StepContext, build_defenses

ROOT = Path(__file__).resolve().parents[1]


def probe(gate_init: float, fit_weight: float, steps: int, seed: int = 0) -> list[tuple[int, float, float, float]]:
    torch.manual_seed(seed)
    d = build_defenses({"name": ["gaussian_noise", "cem_slot_cross"], "sigma": 0.025,
                        "cem_slot_cross": {"warmup_epochs": 0, "shutoff_steps": 0, "lambda_schedule": "constant",
                                           "fit_weight": fit_weight, "gate_init": gate_init}}).get("cem_slot_cross")
    d.allocate(10, 512)
    d._protect()
    centres = torch.randn(10, 5, 512)
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    rows = []
    for it in range(steps + 1):
        y, mode = torch.randint(0, 10, (128,)), torch.randint(0, 5, (128,))
        z = torch.sigmoid(centres[y, mode] + 0.5 * torch.randn(128, 512))
        out = d.loss(StepContext(x=torch.zeros(128, 1), y=y, z=z, z_sent=z, logits=torch.zeros(128, 10), epoch=0,
                                 step=it))
        opt.zero_grad()
        sum(out.values()).backward()
        a = d.surrogate_net.alpha_attn
        if it % 50 == 0:
            rows.append((it, float(a.detach()), math.tanh(float(a.detach())), float(a.grad)))
        opt.step()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    lines = ["| gate_init | fit_weight | step | alpha_attn | tanh(alpha_attn) | d loss / d alpha_attn |", "|---|---|---|---|---|---|"]
    for gate_init, fit_weight in [(0.01, 1.0), (0.1, 1.0), (0.01, 100.0)]:
        for it, a, t, g in probe(gate_init, fit_weight, args.steps):
            lines.append(f"| {gate_init} | {fit_weight} | {it} | {a:.4f} | {t:.4f} | {g:.2e} |")
            print(lines[-1], flush=True)
    note = ("\nSynthetic sigmoid features (512 values, 10 classes x 5 modes, batch 128), the defense's own loss only, "
            "SGD lr 0.05 momentum 0.9 wd 5e-4, seed 0, 1 thread (benchmarks/cem_gate_probe.py).\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cem_gate_probe.md").write_text("\n".join(lines) + "\n" + note)


if __name__ == "__main__":
    main()
