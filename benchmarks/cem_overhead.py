"""Benchmark: training-step and epoch overhead of the CEM defenses (issues 4 and 11).

For each CEM variant, the time of ``[gaussian_noise, <cem>]`` divided by that of the same model with
``gaussian_noise`` only, measured side by side in one process: the model of
``configs/cifar10_vgg11_cem_cpu.yaml`` (VGG11-BN x0.5 cut after conv2, reference bottleneck conv 64 -> 8 without
BN/ReLU, sigmoid), sigma 0.025, lambda 16, batch 128, CIFAR-sized random inputs, the trainer's own
``train_epoch`` (one loop for everyone; the attention variants with warm-up and early shut-off off, so their
term is on). Variants are interleaved round by round (each round trains one epoch of ``--steps`` steps of every
variant) and the median over rounds is reported, so slow phases of a shared machine hit all variants alike.
``step_ms`` excludes the between-epoch work; ``epoch_ratio`` includes it (``on_epoch_end``: for cem_gmm the full
refit: eval-mode encoding of every training image of the epoch and the k-means). CPU always, CUDA too when
available. Target (issue 11): each variant at most 1.15x noise only per epoch, full refit included.

    nice -n 10 python benchmarks/cem_overhead.py                 # defaults: 5 rounds of 4 steps
    python benchmarks/cem_overhead.py --rounds 3 --steps 2 --devices cpu
    OMP_NUM_THREADS=1 nice -n 15 python benchmarks/cem_overhead.py --devices cpu --threads 1 --rounds 7 \
        --variants cem_slot_cross,cem_gated_pool --tag slot_1thread   # the slot surrogate at 1 thread

Writes ``benchmarks/results/cem_overhead.csv`` and ``.md``.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch

from splitveil.data.base import DataBundle, ImageSplit
from splitveil.defenses import build_defenses
from splitveil.models import ModelConfig, build_split_model
from splitveil.training import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "noise only": {"name": "gaussian_noise"},
    "cem_gmm (reference)": {"name": ["gaussian_noise", "cem_gmm"], "lambda": 16},
    "cem_gmm (hinge_diag)": {"name": ["gaussian_noise", "cem_gmm"], "lambda": 16, "form": "hinge_diag"},
    "cem_gmm (logdet)": {"name": ["gaussian_noise", "cem_gmm"], "lambda": 16, "form": "logdet"},
    "cem_slot_cross": {"name": ["gaussian_noise", "cem_slot_cross"], "lambda": 16,
                       "cem_slot_cross": {"warmup_epochs": 0, "shutoff_steps": 0}},
    "cem_gated_pool": {"name": ["gaussian_noise", "cem_gated_pool"], "lambda": 16, "warmup_epochs": 0},
}


def synthetic_data(n: int, seed: int = 0) -> DataBundle:
    g = torch.Generator().manual_seed(seed)
    split = ImageSplit(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                       torch.randint(0, 10, (n,), generator=g), torch.arange(n), "train")
    return DataBundle("synthetic", split, split, split, 10, [str(i) for i in range(10)], (0.5,) * 3, (0.25,) * 3)


def build(variant: dict, data: DataBundle, device, args) -> Trainer:
    torch.manual_seed(0)
    model = build_split_model(ModelConfig(name="vgg11_bn", width=args.width, cut="conv2", bottleneck_channels=8,
                                          bottleneck_norm=False, bottleneck_act="none", sigmoid=True),
                              10, (3, 32, 32))
    defenses = build_defenses({**variant, "sigma": 0.025})
    defenses.setup(model, data, device)
    cfg = TrainConfig(epochs=10 ** 6, batch_size=args.batch, optimizer="sgd", lr=0.05, momentum=0.9,
                      weight_decay=5e-4, schedule="none")
    return Trainer(model, defenses, data, cfg, device, show_progress=False)


def timed_epoch(trainer: Trainer, device) -> tuple[float, float]:
    """(seconds per training step excluding on_epoch_end, seconds of on_epoch_end)."""
    stack = trainer.defenses
    original = stack.on_epoch_end
    spent = {}

    def timed(tr, epoch):
        _sync(device)
        t = time.perf_counter()
        original(tr, epoch)
        _sync(device)
        spent["end"] = time.perf_counter() - t

    stack.on_epoch_end = timed
    try:
        _sync(device)
        t = time.perf_counter()
        trainer.train_epoch()
        _sync(device)
        total = time.perf_counter() - t
    finally:
        del stack.on_epoch_end
    steps = len(trainer.data.train) // trainer.cfg.batch_size
    return (total - spent["end"]) / steps, spent["end"]


def step_flops(trainer: Trainer) -> int:
    """Matmul/conv FLOPs of one training step (forward + backward; torch.utils.flop_counter): a load-independent
    complement to the wall-clock ratio (element-wise ops are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    x, y = next(trainer.data.batches(trainer.data.train, trainer.cfg.batch_size, trainer.device))
    from splitveil.defenses import StepContext

    with FlopCounterMode(display=False) as fc:
        z = trainer.model.encoder(x)
        logits = trainer.model.decoder(trainer.defenses.transform(z, training=True))
        step = StepContext(x, y, z, z, logits, trainer.epoch, trainer.global_step)
        loss = trainer.task_loss(logits, y) + sum(trainer.defenses.loss(step).values())
        loss.backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return int(fc.get_total_flops())


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def load_average() -> str:
    """The machine's load average (1, 5, 15 min) as ``uptime`` reports it, recorded beside the timings."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def run(device: str, args) -> list[dict]:
    data = synthetic_data(args.batch * args.steps)
    names = ["noise only"] + [k for k in VARIANTS if k != "noise only" and (not args.variants or k in args.variants)]
    trainers = {k: build(VARIANTS[k], data, device, args) for k in names}
    for tr in trainers.values():  # warm-up epoch: allocations, the GMM's first refit (its term is then on)
        timed_epoch(tr, device)
    steps: dict[str, list[float]] = {k: [] for k in trainers}
    ends: dict[str, list[float]] = {k: [] for k in trainers}
    for r in range(args.rounds):
        for k, tr in trainers.items():
            s, e = timed_epoch(tr, device)
            steps[k].append(s)
            ends[k].append(e)
        print(f"[{device}] round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {steps[k][-1] * 1e3:.0f} ms" for k in steps),
              flush=True)
    flops = {k: step_flops(tr) for k, tr in trainers.items()}
    base = statistics.median(steps["noise only"])
    n_steps = args.steps
    epochs = {k: [s * n_steps + e for s, e in zip(steps[k], ends[k])] for k in trainers}
    base_epoch = statistics.median(epochs["noise only"])
    rows = []
    for k in trainers:
        med = statistics.median(steps[k])
        rows.append({"device": device, "variant": k, "step_ms": round(med * 1e3, 2),
                     "ratio_to_noise": round(med / base, 3),
                     "epoch_ms": round(statistics.median(epochs[k]) * 1e3, 1),
                     "epoch_ratio": round(statistics.median(epochs[k]) / base_epoch, 3),
                     "step_ms_min": round(min(steps[k]) * 1e3, 2), "step_ms_max": round(max(steps[k]) * 1e3, 2),
                     "flops_ratio": round(flops[k] / flops["noise only"], 4),
                     "epoch_end_ms": round(statistics.median(ends[k]) * 1e3, 2),
                     "batch": args.batch, "rounds": args.rounds, "steps_per_round": args.steps,
                     "threads": torch.get_num_threads()})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8, help="training steps (one epoch) per variant per round")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--variants", default="", help="comma-separated variants besides noise only (default: all): "
                    + ", ".join(k for k in VARIANTS if k != "noise only"))
    ap.add_argument("--tag", default="", help="suffix of the result files (cem_overhead_<tag>.csv/.md)")
    args = ap.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    load_before = load_average()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for dev in args.devices.split(","):
        if dev == "cuda" and not torch.cuda.is_available():
            print("CUDA not available: skipped")
            continue
        rows += run(dev, args)
    load_after = load_average()
    stem = "cem_overhead" + (f"_{args.tag}" if args.tag else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cols = ["device", "variant", "step_ms", "ratio_to_noise", "epoch_ms", "epoch_ratio", "step_ms_min", "step_ms_max",
            "flops_ratio", "epoch_end_ms"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    note = (f"\nbatch {args.batch}, VGG11-BN x{args.width} cut conv2 + reference bottleneck (8 ch, no BN/ReLU) + "
            f"sigmoid, 3x32x32 inputs, sigma 0.025, lambda 16, median of {args.rounds} interleaved rounds of one "
            f"{args.steps}-step epoch; torch threads {torch.get_num_threads()}. epoch = steps + on_epoch_end (cem_gmm: "
            "the full refit on the epoch's training images).\n"
            f"Load average (1/5/15 min, /proc/loadavg as uptime shows it): {load_before} before, {load_after} after; "
            f"measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n" + note)
    print("\n".join(lines) + note)


if __name__ == "__main__":
    main()
