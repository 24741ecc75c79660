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
    weak, unconverged = set(r.weak_attacks()), set(r.unconverged_attacks())
    for name, a in r.attacks.items():
        flags = [t for t, on in (("weak: not below the mean-image baseline", name in weak),
                                 ("unconverged: still improving at the end of its budget", name in unconverged)) if on]
        note = f" ({'; '.join(flags)})" if flags else ""
        lines += [f"| {name} MSE | {a.mse:.5f} +- {a.mse_std:.5f}{note} |", f"| {name} PSNR (dB) | {a.psnr:.2f} |",
                  f"| {name} SSIM | {a.ssim:.4f} |"]
    if r.baseline_mse is not None:
        lines.append(f"| mean-image baseline MSE | {r.baseline_mse:.5f} |")
    run_flags = r.run_flags()
    lines.append(f"| flags | {', '.join(run_flags) if run_flags else 'none'} |")
    c = r.cost
    lines += [f"| encoder params | {c.encoder_params:,} |", f"| encoder FLOPs / image | {c.encoder_flops:,} |",
              f"| encoder latency / image (ms) | {c.latency_ms:.3f} |", f"| payload / image (bytes) | {c.payload_bytes:,} |",
              *_time_rows(r.timings or {})]
    return "\n".join(lines)


def _time_rows(t: dict) -> list[str]:
    """Wall time (cumulative over the sessions of a resumed run) and the time of each stage."""
    if "total_s" not in t:
        return []
    sessions = int(t.get("sessions", 1) or 1)
    rows = [f"| wall time (s) | {t['total_s']:.1f}" + (f" over {sessions} sessions (resumed) |" if sessions > 1 else " |")]
    stages = [(k[:-2], v) for k, v in t.items() if k.endswith("_s") and k not in ("total_s", "session_s")]
    if stages:
        rows.append("| time per stage (s) | " + ", ".join(f"{k} {v:.1f}" for k, v in stages) + " |")
    return rows


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
