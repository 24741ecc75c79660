"""``splitveil run CONFIG``: train, attack, measure, record; print a summary table."""
from __future__ import annotations

from . import add_config_arguments, command, config_from_args


def summary_table(m) -> str:
    """The run's summary as a markdown table; ``m``: its metrics (a dict as in metrics.json, or a RunRecord)."""
    from ..results import RunRecord

    r = m if isinstance(m, RunRecord) else RunRecord.from_dict(m)
    lines = [f"run {r.run_id}",
             f"dataset {r.dataset}  model {r.model}  cut {r.cut} {tuple(r.feature_shape or ())}  "
             f"defense {r.defense}  seed {r.seed}",
             "", "| metric | value |", "|---|---|", f"| accuracy | {r.accuracy:.4f} |"]
    for name, a in r.attacks.items():
        lines += [f"| {name} MSE | {a.mse:.5f} +- {a.mse_std:.5f} |", f"| {name} PSNR (dB) | {a.psnr:.2f} |",
                  f"| {name} SSIM | {a.ssim:.4f} |"]
    lines.append(f"| mean-image baseline MSE | {r.baseline_mse:.5f} |")
    c = r.cost
    lines += [f"| encoder params | {c.encoder_params:,} |", f"| encoder FLOPs / image | {c.encoder_flops:,} |",
              f"| encoder latency / image (ms) | {c.latency_ms:.3f} |", f"| payload / image (bytes) | {c.payload_bytes:,} |",
              f"| wall time (s) | {r.timings['total_s']:.1f} |"]
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
