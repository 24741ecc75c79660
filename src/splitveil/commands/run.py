"""``splitveil run CONFIG``: train, attack, measure, record; print a summary table."""
from __future__ import annotations

from . import add_config_arguments, command, config_from_args


def summary_table(m: dict) -> str:
    lines = [f"run {m['run_id']}",
             f"dataset {m['dataset']}  model {m['model']}  cut {m['cut']} {tuple(m['feature_shape'])}  "
             f"defense {m['defense']}  seed {m['seed']}",
             "", "| metric | value |", "|---|---|", f"| accuracy | {m['accuracy']:.4f} |"]
    for name, r in m["attacks"].items():
        lines += [f"| {name} MSE | {r['mse']:.5f} +- {r['mse_std']:.5f} |", f"| {name} PSNR (dB) | {r['psnr']:.2f} |",
                  f"| {name} SSIM | {r['ssim']:.4f} |"]
    lines.append(f"| mean-image baseline MSE | {m['baseline']['mean_image']['mse']:.5f} |")
    c = m["cost"]
    lines += [f"| encoder params | {c['encoder_params']:,} |", f"| encoder FLOPs / image | {c['encoder_flops']:,} |",
              f"| encoder latency / image (ms) | {c['latency_ms']:.3f} |", f"| payload / image (bytes) | {c['payload_bytes']:,} |",
              f"| wall time (s) | {m['timings']['total_s']:.1f} |"]
    return "\n".join(lines)


@command("run", "train a split model under a defense, attack it and record accuracy, privacy and cost")
class RunCommand:
    @staticmethod
    def add_arguments(p) -> None:
        add_config_arguments(p)
        p.add_argument("--out", default="runs", help="folder of run folders and results.sqlite (default: runs)")
        p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoints")
        p.add_argument("--force", action="store_true", help="re-run even if this exact config already finished")

    @staticmethod
    def handler(args) -> int:
        from pathlib import Path

        from ..experiments import run_experiment

        cfg = config_from_args(args)
        m = run_experiment(cfg, args.out, resume=args.resume, force=args.force)
        print(summary_table(m))
        print(f"\nresults in {Path(args.out) / m['run_id']}")
        return 0
