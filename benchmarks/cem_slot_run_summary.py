"""Summary of a ``cem_slot_cross`` run of ``configs/cifar10_vgg11_cem_cpu.yaml`` (issue 25): when the early
shut-off acted and how the tanh gates moved, read from the run folder's ``metrics.json`` when the run finished,
else from its per-epoch ``checkpoint.pt`` snapshots collected with ``--watch`` while it runs.

    python benchmarks/cem_slot_run_summary.py RUN_DIR --watch SNAPSHOTS.jsonl   # poll: one line per epoch
    python benchmarks/cem_slot_run_summary.py RUN_DIR --snapshots SNAPSHOTS.jsonl --machine "..." \
        --out benchmarks/results/cem_slot_cpu_run.md

The shut-off is seen in the epoch means of ``loss.cem_slot_cross.L_C``: 0 while every step of an epoch was
muted, > 0 once the term acts.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


def snapshot(run: Path) -> dict | None:
    ckpt = run / "checkpoint.pt"
    if not ckpt.exists():
        return None
    st = torch.load(ckpt, map_location="cpu", weights_only=True)
    d = {k.split(".", 2)[-1]: v for k, v in st["defenses"].items()
         if k.endswith(("alpha_attn", "alpha_ffn", "first_active_step"))}
    last = st["history"][-1] if st["history"] else {}
    return {"epoch": st["epoch"], "global_step": st["global_step"],
            "first_active_step": int(d["first_active_step"]),
            "tanh_alpha_attn": math.tanh(float(d["surrogate_net.alpha_attn"])),
            "tanh_alpha_ffn": math.tanh(float(d["surrogate_net.alpha_ffn"])),
            "L_C": last.get("loss.cem_slot_cross.L_C"), "fit": last.get("loss.cem_slot_cross.fit"),
            "test_accuracy": last.get("test_accuracy"), "lr": last.get("lr"),
            "load": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
            "time": time.strftime("%H:%M:%S", time.gmtime())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--watch", type=Path, help="append one snapshot per new epoch to this file (polls every 30 s)")
    ap.add_argument("--snapshots", type=Path)
    ap.add_argument("--machine", default="")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.watch:
        seen = -1
        while not (args.run / "metrics.json").exists():
            try:
                s = snapshot(args.run)
            except Exception:       # the checkpoint is being replaced: try again
                s = None
            if s and s["epoch"] != seen:
                seen = s["epoch"]
                with open(args.watch, "a") as f:
                    f.write(json.dumps(s) + "\n")
            time.sleep(30)
        return
    snaps = [json.loads(line) for line in open(args.snapshots)] if args.snapshots else []
    metrics = args.run / "metrics.json"
    lines = [f"# cem_slot_cross in configs/cifar10_vgg11_cem_cpu.yaml ({args.run.name})", ""]
    if args.machine:
        lines += [f"Machine: {args.machine}", ""]
    if metrics.exists():
        m = json.loads(metrics.read_text())
        info = m["defense_info"]["cem_slot_cross"]
        lines += ["Finished run (metrics.json):", "",
                  f"- first_active_step {info['first_active_step']}, shutoff_until_step {info['shutoff_until_step']}, "
                  f"gate_open_steps {info['gate_open_steps']}",
                  f"- tanh(alpha) at initialisation {info['tanh_alpha_init']:.4f}; at the end: attn "
                  f"{info['tanh_alpha_attn_end']:.4f}, ffn {info['tanh_alpha_ffn_end']:.4f}", ""]
        snaps = [{"epoch": h["epoch"], "tanh_alpha_attn": a["tanh_alpha_attn"], "tanh_alpha_ffn": a["tanh_alpha_ffn"],
                  "L_C": h.get("loss.cem_slot_cross.L_C"), "fit": h.get("loss.cem_slot_cross.fit"),
                  "test_accuracy": h.get("test_accuracy"), "lr": h.get("lr")}
                 for h, a in zip(m["history"], info["tanh_alpha_per_epoch"])]
    else:
        last = snaps[-1] if snaps else {}
        lines += [f"Unfinished run: snapshots of its checkpoint after each epoch (last: epoch {last.get('epoch')}, "
                  f"global step {last.get('global_step')}); first_active_step {last.get('first_active_step')}.", ""]
    lines += ["| epoch | L_C (epoch mean) | fit | tanh alpha_attn | tanh alpha_ffn | test accuracy | lr | load (1/5/15) | time UTC |",
              "|---|---|---|---|---|---|---|---|---|"]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)
    for s in snaps:
        lines.append(f"| {s['epoch']} | {f(s.get('L_C'), '.5f')} | {f(s.get('fit'), '.5f')} | {s['tanh_alpha_attn']:.4f} | "
                     f"{s['tanh_alpha_ffn']:.4f} | {f(s.get('test_accuracy'), '.3f')} | {f(s.get('lr'), 'g')} | "
                     f"{s.get('load', '-')} | {s.get('time', '-')} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
