"""Benchmark: what a whole run costs, stage by stage (issue 23).

Every measurement is one whole ``splitveil run`` in a fresh process (so the allocator, the OpenMP settings and
the kernel caches start as a user's run starts), read back from its ``metrics.json``: the stages (data,
training split into steps / per-epoch evaluation / checkpoints, attacks, cost) and every attack's fit and
inversion seconds. Variants are interleaved round by round in one invocation, so a slow phase of a shared
machine hits them alike; the load average is recorded before and after every run.

    python benchmarks/run_cost.py quickstart --rounds 2                      # fp32 against auto, 1 thread
    python benchmarks/run_cost.py quickstart --before /tmp/before             # also an older checkout, interleaved
    python benchmarks/run_cost.py paper --rounds 1                            # the study protocol, scaled down
    python benchmarks/run_cost.py contention --rounds 2                       # threads with one busy core
    python benchmarks/run_cost.py datapath                                    # one epoch of batches, no model
    python benchmarks/run_cost.py utilisation                                 # achieved GFLOP/s against the peak

``paper`` runs configs/cifar10_vgg11_cem_paper_cpu.yaml scaled down (``--train-images``, 1 training epoch, 1
epoch of each attack) and reports the per-unit costs (seconds per training epoch of 40,000 images, per attack
epoch, per evaluation) from which the full protocol's run time is projected. ``contention`` runs the
quickstart at the default thread count and at 1 thread while another process keeps one core busy, with the
OpenMP wait policy active (the default) and passive. ``datapath`` times one epoch of the training batches of the
study's data (decode from the cache, crop + flip, normalise) without any model, against the training step.

Results are merged by label into benchmarks/results/run_cost.json; ``--md`` rewrites
benchmarks/results/run_cost.md from it (generated, never edited by hand)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
JSON = RESULTS / "run_cost.json"
PAPER = "configs/cifar10_vgg11_cem_paper_cpu.yaml"


def loadavg() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


def one_run(repo: Path, config: str, sets: list[str], env: dict[str, str], out: Path) -> dict:
    """One whole run in a fresh process; returns its timings, attack seconds, accuracy and the load around it."""
    cmd = [sys.executable, "-m", "splitveil", "run", str(repo / config), "--out", str(out), "--force",
           "--no-progress"] + [a for s in sets for a in ("--set", s)]
    penv = {**os.environ, "PYTHONPATH": str(repo / "src"), **env}
    before = loadavg()
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=penv, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads(next(out.glob("*/metrics.json")).read_text())
    attacks = {n: {"fit_s": a.get("fit_seconds"), "invert_s": a.get("invert_seconds"), "mse": a.get("mse"),
                   "epochs": a.get("fit.epochs"), "fit_images": a.get("fit.fit_images")}
               for n, a in metrics.get("attacks", {}).items()}
    return {"wall_s": wall, "timings": metrics.get("timings", {}), "attacks": attacks,
            "accuracy": metrics.get("accuracy"), "precision": metrics.get("precision"),
            "threads": metrics.get("threads"), "load_before": before, "load_after": loadavg()}


def interleaved(variants: dict[str, tuple[Path, str, list[str], dict[str, str]]], rounds: int) -> dict[str, list[dict]]:
    res: dict[str, list[dict]] = {k: [] for k in variants}
    for r in range(rounds):
        for name, (repo, config, sets, env) in variants.items():
            with tempfile.TemporaryDirectory(prefix="run_cost-") as d:
                out = one_run(repo, config, sets, env, Path(d))
            res[name].append(out)
            print(f"round {r + 1} {name}: wall {out['wall_s']:.1f} s, train {out['timings'].get('train_s', 0):.1f} s, "
                  f"attacks {out['timings'].get('attacks_s', 0):.1f} s, load {out['load_before']}", flush=True)
    return res


def median_of(runs: list[dict], key) -> float | None:
    vals = [v for v in (key(r) for r in runs) if v is not None]
    return statistics.median(vals) if vals else None


def summarise(runs: list[dict]) -> dict:
    t = lambda k: (lambda r: r["timings"].get(k))  # noqa: E731
    out = {"n": len(runs), "wall_s": median_of(runs, lambda r: r["wall_s"]),
           **{k: median_of(runs, t(k)) for k in ("data_s", "train_s", "train_steps_s", "train_eval_s",
                                                  "train_checkpoint_s", "attacks_s", "cost_s")},
           "accuracy": [r["accuracy"] for r in runs], "load": [r["load_before"] for r in runs],
           "threads": runs[0]["threads"], "precision": runs[0]["precision"]}
    for a in runs[0]["attacks"]:
        out[f"{a}.fit_s"] = median_of(runs, lambda r: r["attacks"][a]["fit_s"])
        out[f"{a}.invert_s"] = median_of(runs, lambda r: r["attacks"][a]["invert_s"])
        out[f"{a}.mse"] = [r["attacks"][a]["mse"] for r in runs]
        out[f"{a}.epochs"] = runs[0]["attacks"][a]["epochs"]
        out[f"{a}.fit_images"] = runs[0]["attacks"][a]["fit_images"]
    return out


def record(label: str, data: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    all_ = json.loads(JSON.read_text()) if JSON.exists() else {}
    all_[label] = {**data, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    JSON.write_text(json.dumps(all_, indent=1, default=str))
    print(f"recorded '{label}' in {JSON}")


def machine() -> str:
    flags = ""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    kind = "AVX512-BF16" if "avx512_bf16" in flags else "no AVX512-BF16"
    kind += ", AMX" if "amx_bf16" in flags else ", no AMX"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {kind}"


# -- the modes ---------------------------------------------------------------------------------------------------
def mode_quickstart(args) -> None:
    repos = {"": Path(args.repo).resolve()}
    if args.before:
        repos = {"before ": Path(args.before).resolve(), "after ": Path(args.repo).resolve()}
    threads = [f"threads={args.threads}"]
    variants = {f"{tag}{p}": (repo, "configs/quickstart.yaml",
                              threads + [f"train.precision={p}", f"train.channels_last={'false' if p == 'fp32' else 'auto'}"], {})
                for tag, repo in repos.items() for p in args.precisions}
    res = interleaved(variants, args.rounds)
    record(f"quickstart/{args.label}", {**({"before_repo_commit": _commit(repos["before "])} if args.before else {}),
                                        "after_repo_commit": _commit(Path(args.repo).resolve()),
                                        **{p: summarise(r) for p, r in res.items()}})


def _commit(repo: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def mode_paper(args) -> None:
    repo = Path(args.repo).resolve()
    sets = [f"threads={args.threads}", f"data.train_size={args.train_images}", "train.epochs=1",
            "train.warmup_epochs=0", "train.milestones=[]", "attacks.inverse_network.epochs=1",
            "attacks.gan.epochs=1", f"data.test_size={args.test_images}"]
    variants = {p: (repo, PAPER, sets + [f"train.precision={p}", f"train.channels_last={'false' if p == 'fp32' else 'auto'}"],
                    {}) for p in args.precisions}
    res = interleaved(variants, args.rounds)
    out = {}
    for p, runs in res.items():
        s = summarise(runs)
        # per-unit costs, projected onto the full protocol (40,000 training images x 20 epochs, 10,000 test
        # images evaluated per epoch and 5 times at the end, 9,000 attacker images x 16 + 3 epochs)
        s["train_epoch_40k_s"] = s["train_steps_s"] * 40000 / args.train_images if s["train_steps_s"] else None
        s["eval_10k_s"] = s["train_eval_s"] * 10000 / args.test_images if s["train_eval_s"] else None
        inv = s.get("inverse_network.fit_s")
        gan = s.get("gan.fit_s")
        s["projected_full_run_s"] = ((s["train_epoch_40k_s"] or 0) * 20 + (s["eval_10k_s"] or 0) * 25
                                     + (inv or 0) * 16 + (gan or 0) * 3)
        out[p] = s
    record(f"paper/{args.label}", {"train_images": args.train_images, "test_images": args.test_images, **out})


def _busy() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def mode_contention(args) -> None:
    repo = Path(args.repo).resolve()
    default = [f"train.precision=auto"]
    variants = {
        "default threads": (repo, "configs/quickstart.yaml", default, {}),
        "1 thread": (repo, "configs/quickstart.yaml", default + ["threads=1"], {}),
        "default threads, OMP passive": (repo, "configs/quickstart.yaml", default, {"OMP_WAIT_POLICY": "PASSIVE"}),
    }
    hog = _busy() if not args.no_hog else None
    try:
        time.sleep(1.0)
        res = interleaved(variants, args.rounds)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    record(f"contention/{args.label}", {"background": "one busy process" if hog else "none",
                                        **{k: summarise(v) for k, v in res.items()}})


def mode_datapath(args) -> None:
    sys.path.insert(0, str(Path(args.repo).resolve() / "src"))
    import torch

    from splitveil.experiments.config import load_config
    from splitveil.data import build_data

    torch.set_num_threads(args.threads)
    cfg = load_config(ROOT / PAPER)
    data = build_data(cfg.data, seed=0)
    g = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    n = 0
    for x, _ in data.batches(data.train, cfg.train.batch_size, "cpu", shuffle=True, generator=g, augment=True,
                             drop_last=True):
        n += len(x)
    s = time.perf_counter() - t
    record(f"datapath/{args.label}", {"images": n, "seconds": s, "images_per_s": n / s, "threads": args.threads,
                                      "load": loadavg()})
    print(f"data path: {n} images in {s:.2f} s ({n / s:.0f} img/s)")


def mode_utilisation(args) -> None:
    """Achieved GFLOP/s of the study model's training step and of the inverse network's fit step (FLOPs counted by
    torch.utils.flop_counter, a multiply-add = 2) against this machine's measured peak: a bf16 / fp32 matmul
    (2048^3) and a 3x3 convolution (128 -> 128 channels, 16x16, batch 256, channels-last), best of 5."""
    sys.path.insert(0, str(Path(args.repo).resolve() / "src"))
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from splitveil.attacks.inverse_network import InverseNetworkAttack, InverseNetworkParams
    from splitveil.models import ModelConfig, build_split_model
    from splitveil.runtime import tune_allocator

    tune_allocator()
    torch.set_num_threads(args.threads)

    def best(fn, reps=5):
        fn()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return min(ts)

    out = {"threads": args.threads, "load": loadavg()}
    for dt, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        a, b = torch.randn(2048, 2048).to(dt), torch.randn(2048, 2048).to(dt)
        out[f"peak_matmul_{name}"] = 2 * 2048 ** 3 / best(lambda: a @ b) / 1e9
        x = torch.randn(256, 128, 16, 16).to(dt).contiguous(memory_format=torch.channels_last)
        w = torch.randn(128, 128, 3, 3).to(dt).contiguous(memory_format=torch.channels_last)
        out[f"peak_conv_{name}"] = 2 * 256 * 128 * 128 * 9 * 256 / best(lambda: F.conv2d(x, w, padding=1)) / 1e9

    def step(module, opt, x, target, loss_fn, bf16):
        """One optimisation step as the trainer / the attack fit take it: autocast forward, float32 loss."""
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = module(x)
        loss = loss_fn(y.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def measured(model_step):
        fc = FlopCounterMode(display=False)
        with fc:
            model_step()
        return fc.get_total_flops() / best(model_step, 3) / 1e9

    for prec in ("fp32", "bf16"):
        torch.manual_seed(0)
        m = build_split_model(ModelConfig(name="vgg11_bn", width=1.0, cloud_width=0.5, cut="conv2", bottleneck_channels=8,
                                          bottleneck_norm=False, bottleneck_act="none", sigmoid=True), 10, (3, 32, 32))
        cl = prec == "bf16"
        if cl:
            m = m.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(m.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)
        xb = torch.randn(128, 3, 32, 32)
        xb = xb.contiguous(memory_format=torch.channels_last) if cl else xb
        yb = torch.randint(0, 10, (128,))

        out[f"train_step_{prec}"] = measured(lambda: step(m, opt, xb, yb, F.cross_entropy, cl))
        dec = InverseNetworkAttack(InverseNetworkParams(channels=128), show_progress=False).build_decoder((8, 8, 8), (3, 32, 32))
        if cl:
            dec = dec.to(memory_format=torch.channels_last)
        dopt = torch.optim.AdamW(dec.parameters(), 1e-3)
        z = torch.rand(128, 8, 8, 8)
        z = z.contiguous(memory_format=torch.channels_last) if cl else z
        tgt = torch.rand(128, 3, 32, 32)

        out[f"attack_step_{prec}"] = measured(lambda: step(dec, dopt, z, tgt, F.mse_loss, cl))
    for prec in ("fp32", "bf16"):
        for what in ("train_step", "attack_step"):
            out[f"{what}_{prec}_of_conv_peak"] = out[f"{what}_{prec}"] / out[f"peak_conv_{prec}"]
    record(f"utilisation/{args.label}", out)
    for k, v in out.items():
        print(k, v)


# -- the markdown ------------------------------------------------------------------------------------------------
def fmt(v, nd=1) -> str:
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def write_md() -> Path:
    d = json.loads(JSON.read_text()) if JSON.exists() else {}
    lines = ["# Whole-run cost (issue 23)", "", "Generated by `python benchmarks/run_cost.py --md` from "
             "`run_cost.json` (every number below is read from it). Each run is a fresh `splitveil run` process; "
             "variants interleaved round by round; medians over rounds; the load average before each run is "
             "listed. Machine and date per section.", ""]
    for label, sec in d.items():
        kind = label.split("/")[0]
        lines += [f"## {label}", "", f"{sec.get('machine')}, {sec.get('date')}", ""]
        if kind in ("quickstart", "paper", "contention"):
            variants = {k: v for k, v in sec.items() if isinstance(v, dict) and "wall_s" in v}
            cols = ["wall_s", "data_s", "train_s", "train_steps_s", "train_eval_s", "train_checkpoint_s", "attacks_s",
                    "cost_s"]
            attack_cols = sorted({k for v in variants.values() for k in v if k.endswith(".fit_s") or k.endswith(".invert_s")})
            lines.append("| variant | threads | " + " | ".join(cols + attack_cols) + " | accuracy | load before |")
            lines.append("|---" * (len(cols) + len(attack_cols) + 4) + "|")
            for name, v in variants.items():
                lines.append(f"| {name} | {v.get('threads')} | " + " | ".join(fmt(v.get(c)) for c in cols + attack_cols)
                             + f" | {', '.join(fmt(a, 4) for a in v.get('accuracy', []))} | "
                             + "; ".join(str(l[0]) if l else "-" for l in v.get("load", [])) + " |")
            base = variants.get("fp32") or variants.get("before fp32") or variants.get("1 thread")
            for name, v in variants.items():
                if base is not None and v is not base and base.get("wall_s") and v.get("wall_s"):
                    ref = next(k for k, x in variants.items() if x is base)
                    lines.append(f"- {name} against {ref}: whole run "
                                 f"{base['wall_s'] / v['wall_s']:.2f}x" +
                                 (f", training steps {base['train_steps_s'] / v['train_steps_s']:.2f}x"
                                  if base.get("train_steps_s") and v.get("train_steps_s") else ""))
            if kind == "paper":
                for name, v in variants.items():
                    lines.append(f"- {name}: one training epoch of 40,000 images {fmt(v.get('train_epoch_40k_s'))} s, "
                                 f"one evaluation of 10,000 test images {fmt(v.get('eval_10k_s'))} s; projected full "
                                 f"protocol (20 epochs, 25 evaluations, 16 + 3 attack epochs) "
                                 f"{fmt((v.get('projected_full_run_s') or 0) / 60)} min")
        elif kind == "utilisation":
            lines.append("| GFLOP/s | fp32 | bf16 |")
            lines.append("|---|---|---|")
            for what in ("peak_matmul", "peak_conv", "train_step", "attack_step"):
                lines.append(f"| {what} | {fmt(sec.get(what + '_fp32'))} | {fmt(sec.get(what + '_bf16'))} |")
            for what in ("train_step", "attack_step"):
                lines.append(f"- {what}: {100 * sec[what + '_fp32_of_conv_peak']:.0f}% of the fp32 conv peak, "
                             f"{100 * sec[what + '_bf16_of_conv_peak']:.0f}% of the bf16 conv peak "
                             f"({sec['threads']} thread(s), load {sec['load']})")
        elif kind == "datapath":
            lines.append(f"- one epoch of training batches: {sec['images']} images in {sec['seconds']:.1f} s "
                         f"({sec['images_per_s']:.0f} images/s), {sec['threads']} thread(s), load {sec['load']}")
        lines.append("")
    path = RESULTS / "run_cost.md"
    path.write_text("\n".join(lines))
    print(f"wrote {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", nargs="?", choices=["quickstart", "paper", "contention", "datapath", "utilisation"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "auto"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repo", default=str(ROOT), help="the checkout whose src/ runs (e.g. a clone of an older commit)")
    ap.add_argument("--label", default="after")
    ap.add_argument("--before", help="quickstart: also run this checkout (e.g. a clone of the commit before the "
                                     "change), interleaved with --repo")
    ap.add_argument("--train-images", type=int, default=4000)
    ap.add_argument("--test-images", type=int, default=2000)
    ap.add_argument("--no-hog", action="store_true", help="contention mode without the busy background process")
    ap.add_argument("--md", action="store_true", help="(re)write run_cost.md from run_cost.json")
    args = ap.parse_args(argv)
    if args.mode:
        {"quickstart": mode_quickstart, "paper": mode_paper, "contention": mode_contention,
         "datapath": mode_datapath, "utilisation": mode_utilisation}[args.mode](args)
    if args.md or args.mode:
        write_md()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
