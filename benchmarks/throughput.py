"""Benchmark: training-step throughput by precision and memory layout (issue 12).

The model of ``configs/cifar10_vgg11_cpu.yaml`` (VGG11-BN x0.5, cut after conv2, 8-channel bottleneck, 10
classes, 3x32x32 inputs), batch 128, Adam, no defense. Two loops on the same model and batch size:

- ``bare``: a plain PyTorch step on one fixed, already normalised batch (forward, float32 cross-entropy,
  backward, Adam step) with ``torch.autocast`` / channels-last set by hand; fp32 contiguous is what splitveil
  did before issue 12.
- ``splitveil``: ``Trainer.train_epoch`` on a synthetic uint8 dataset of ``--steps`` batches (so it includes
  cutting and normalising batches, the float32 hand-over to the defense hooks, the on-device loss/accuracy
  meters and the epoch bookkeeping).

Each loop runs at fp32, fp32 + channels-last, bf16 and bf16 + channels-last (= ``auto`` on a CPU with
AVX512-BF16/AMX). All 8 variants are interleaved round by round in one process (every round trains
``--steps`` steps of each) and the median over rounds is reported, so slow phases of a shared machine hit
all variants alike; one warm-up round is discarded. Repeated for each ``--threads`` setting.

    flock /tmp/splitveil-heavy.lock python benchmarks/throughput.py --threads 1 2
    python benchmarks/throughput.py --rounds 3 --steps 2 --threads 1      # quick look

Prints a markdown table and writes ``benchmarks/results/throughput.csv``. Targets (issue 12): splitveil's step
within 3% of the bare loop at equal precision; auto >= 1.8x the fp32 throughput on the CPU.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from splitveil.data.base import DataBundle, ImageSplit
from splitveil.defenses import build_defenses
from splitveil.models import ModelConfig, build_split_model
from splitveil.precision import autocast, cpu_has_fast_bf16
from splitveil.training import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def synthetic_data(n: int, seed: int = 0) -> DataBundle:
    g = torch.Generator().manual_seed(seed)
    split = ImageSplit(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                       torch.randint(0, 10, (n,), generator=g), torch.arange(n), "train")
    return DataBundle("synthetic", split, split, split, 10, [str(i) for i in range(10)], (0.5,) * 3, (0.25,) * 3)


def new_model(device):
    torch.manual_seed(0)
    return build_split_model(ModelConfig(name="vgg11_bn", width=0.5, cut="conv2", bottleneck_channels=8),
                             10, (3, 32, 32)).to(device)


class Bare:
    """The plain PyTorch loop: one fixed batch, autocast and channels-last by hand."""

    def __init__(self, data: DataBundle, precision: str, channels_last: bool, device, batch: int, steps: int):
        self.model = new_model(device)
        self.device, self.precision, self.steps = torch.device(device), precision, steps
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        x, y = next(data.batches(data.train, batch, device))
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        self.x, self.y = x, y

    def run(self) -> None:
        self.model.train()
        for _ in range(self.steps):
            with autocast(self.device, self.precision):
                logits = self.model.decoder(self.model.encoder(self.x))
            loss = F.cross_entropy(logits.float(), self.y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()


class Splitveil:
    def __init__(self, data: DataBundle, precision: str, channels_last: bool, device, batch: int, steps: int):
        model = new_model(device)
        defenses = build_defenses({"name": "none"})
        defenses.setup(model, data, torch.device(device))
        cfg = TrainConfig(epochs=10 ** 6, batch_size=batch, optimizer="adam", lr=1e-3, weight_decay=0.0,
                          schedule="none", precision=precision, channels_last=channels_last)
        self.trainer = Trainer(model, defenses, data, cfg, torch.device(device), show_progress=False)

    def run(self) -> None:
        self.trainer.train_epoch()


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(loop, device) -> float:
    _sync(device)
    t = time.perf_counter()
    loop.run()
    _sync(device)
    return time.perf_counter() - t


def measure(device: str, threads: int, args) -> list[dict]:
    torch.set_num_threads(threads)
    data = synthetic_data(args.batch * args.steps)
    loops = {}
    for p, cl in PRECISIONS:
        for kind, cls in (("bare", Bare), ("splitveil", Splitveil)):
            loops[(kind, p, cl)] = cls(data, p, cl, device, args.batch, args.steps)
    for loop in loops.values():  # warm-up round (allocations, oneDNN primitive caches)
        timed(loop, device)
    times: dict = {k: [] for k in loops}
    for _ in range(args.rounds):
        for k, loop in loops.items():
            times[k].append(timed(loop, device) / args.steps)
    ref = statistics.median(times[("bare", "fp32", False)])
    rows = []
    for (kind, p, cl), ts in times.items():
        med = statistics.median(ts)
        bare = statistics.median(times[("bare", p, cl)])
        rows.append({"device": device, "threads": threads, "loop": kind, "precision": p, "channels_last": cl,
                     "step_ms": 1000 * med, "images_per_s": args.batch / med, "speedup_vs_bare_fp32": ref / med,
                     "overhead_vs_bare_same_precision": med / bare - 1.0,
                     "step_ms_min": 1000 * min(ts), "step_ms_max": 1000 * max(ts), "rounds": args.rounds})
    return rows


def table(rows: list[dict]) -> str:
    out = ["| device | threads | precision | channels-last | bare ms/step | splitveil ms/step | splitveil img/s | "
           "overhead vs bare | speed-up vs bare fp32 (splitveil) |",
           "|---|---|---|---|---|---|---|---|---|"]
    by = {(r["device"], r["threads"], r["loop"], r["precision"], r["channels_last"]): r for r in rows}
    for (dev, th, loop, p, cl), r in by.items():
        if loop != "splitveil":
            continue
        b = by[(dev, th, "bare", p, cl)]
        out.append(f"| {dev} | {th} | {p} | {'yes' if cl else 'no'} | {b['step_ms']:.1f} | {r['step_ms']:.1f} | "
                   f"{r['images_per_s']:.0f} | {100 * r['overhead_vs_bare_same_precision']:+.1f}% | "
                   f"{r['speedup_vs_bare_fp32']:.2f}x |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="training steps per variant per round")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "throughput.csv"))
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"cpu fast bf16: {cpu_has_fast_bf16()}, load average {os.getloadavg()}")
    if "cuda" in args.devices:
        print(f"cuda: {torch.cuda.get_device_name()}")
    rows = []
    for dev in args.devices:
        for th in (args.threads if dev == "cpu" else [torch.get_num_threads()]):
            rows += measure(dev, th, args)
            print(table([r for r in rows if r["device"] == dev and r["threads"] == th]), flush=True)
    print(f"load average after: {os.getloadavg()}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
