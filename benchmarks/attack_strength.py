"""Does each attack converge at its default budget? (issue 10)

On one trained target of configs/cifar10_vgg11_cpu.yaml (undefended, and Gaussian noise), at a shallow and a
deep cut, fit each attack at 1/4, 1/2, 1 and 2 times its default budget (decoder epochs, rMLE steps) and
record the test MSE and fit time. The default must reach within 5% of the MSE at twice the budget.

Designed for 2 shared CPU cores: every (cut, defense, attack, budget) cell is one `--part`, each well under
10 minutes under the shared lock; trained targets are cached in runs/attack_strength_cache/ (ignored by git) and finished cells
in benchmarks/results/attack_strength_cells/ (committed: they outlive the machine), so the table fills in over several invocations. `--table` writes benchmarks/results/attack_strength.md
from whatever cells exist, marking the rest "not run". Sizes are reduced on CPU (`--train-size`, `--test-size`,
`--aux-size`, `--target-epochs`): the table states the budget it was measured under.

    flock /tmp/splitveil-heavy.lock python benchmarks/attack_strength.py --list
    flock /tmp/splitveil-heavy.lock python benchmarks/attack_strength.py --part 0
    python benchmarks/attack_strength.py --table
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "runs" / "attack_strength_cache"   # trained targets (checkpoints: runs/ is ignored by git)
CELLS = ROOT / "benchmarks" / "results" / "attack_strength_cells"   # finished cells (small JSON, committed)
OUT = ROOT / "benchmarks" / "results" / "attack_strength.md"
CUTS = {"shallow": "conv2", "deep": "conv6"}
DEFENSES = {"none": {"name": "none"}, "noise0.1": {"name": "gaussian_noise", "sigma": 0.1}}
# row name -> (registered attack, budget field, parameter overrides)
ATTACKS = {"inverse_network": ("inverse_network", "epochs", {}),
           "inverse_network[arch=plain]": ("inverse_network", "epochs", {"arch": "plain"}),
           "inverse_network_plus": ("inverse_network_plus", "epochs", {}),
           "gan": ("gan", "epochs", {}),
           "rmle": ("rmle", "steps", {})}
FACTORS = (0.25, 0.5, 1.0, 2.0)


def cells() -> list[tuple[str, str, str, float]]:
    return [(c, d, a, f) for c in CUTS for d in DEFENSES for a in ATTACKS for f in FACTORS]


def base_tree(args) -> dict:
    """configs/cifar10_vgg11_cpu.yaml with the benchmark's data sizes: every cell's data comes from it."""
    import yaml
    tree = yaml.safe_load((ROOT / "configs" / "cifar10_vgg11_cpu.yaml").read_text())
    tree["data"].update(root=args.data_root, train_size=args.train_size, test_size=args.test_size, aux_size=args.aux_size)
    return tree


def target(args, cut: str, defense: str):
    """The trained target (cached): data, edge."""
    from splitveil import Edge, config_from_dict
    from splitveil.data import build_data
    from splitveil.defenses import build_defenses
    from splitveil.models import build_split_model
    from splitveil.training import Trainer

    tree = base_tree(args)
    tree["model"]["cut"] = CUTS[cut]
    tree["train"]["epochs"] = args.target_epochs
    tree["defense"] = DEFENSES[defense]
    tree["device"], tree["progress"] = "cpu", False
    cfg = config_from_dict(tree, [])
    data = build_data(cfg.data, cfg.seed)
    model = build_split_model(cfg.model, data.num_classes, data.image_shape)
    defenses = build_defenses(cfg.defense)
    defenses.setup(model, data, torch.device("cpu"))
    ck = CACHE / f"target-{cut}-{defense}-{args.train_size}-{args.target_epochs}.pt"
    ck.parent.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(model, defenses, data, cfg.train, torch.device("cpu"), seed=cfg.seed, ckpt_path=ck,
                      show_progress=False, augment=False)
    trainer.fit(resume=True)
    acc = trainer.evaluate("test", 256)
    edge = Edge(model.encoder, defenses).eval()
    for p in edge.parameters():
        p.requires_grad_(False)
    return data, edge, acc


def run_cell(args, cut, defense, attack, factor) -> dict:
    from splitveil.attacks import ATTACKS as REG, run_attack
    data, edge, acc = target(args, cut, defense)
    reg, key, over = ATTACKS[attack]
    cls = REG.get(reg)
    default = getattr(cls.Params(**over), key)
    budget = max(1, round(default * factor))
    params = cls.Params(**{**over, key: budget, **dict(args.set or [])})
    torch.manual_seed(0)
    result, _, _ = run_attack(cls(params, seed=1, show_progress=False), edge, data, seed=7)
    keep = ("fit.steps", "fit.best_epoch", "fit.val_mse", "fit.val_curve", "fit.precision", "fit.channels_last",
            "fit.tv_weight", "fit.tv_selection")
    return {"cut": cut, "defense": defense, "attack": attack, "factor": factor, "budget": f"{budget} {key}",
            "mse": result["mse"], "fit_s": result["fit_seconds"], "invert_s": result.get("invert_seconds"),
            "accuracy": acc, "threads": torch.get_num_threads(),
            "overrides": dict(args.set or []), **{k: result[k] for k in keep if k in result}}


def cell_path(args, c, d, a, f) -> Path:
    """Cached result of one cell; the folder names the sizes it was measured at (tables never mix sizes)."""
    return CELLS / f"{args.train_size}-{args.test_size}-{args.aux_size}-{args.target_epochs}" / f"cell-{c}-{d}-{a}-{f}{''.join(f'-{k}={v}' for k, v in (args.set or []))}.json"


def seconds(v: dict) -> str:
    """The attack's cost of a cell: fit seconds, plus the per-image inversion where it does the work (rMLE);
    cells recorded before ``invert_s`` existed show the cell's wall time (marked) or '?'."""
    if v.get("invert_s") is not None:
        return f"{v['fit_s'] + v['invert_s']:.0f}s"
    if v["fit_s"] >= 1 or v["attack"] != "rmle":
        return f"{v['fit_s']:.0f}s"
    return f"{v['wall_s']:.0f}s wall" if v.get("wall_s") else "?"


def baseline_mse(args) -> float:
    """The trivial attacker's test MSE (the mean aux image for every test image) on the cells' test images."""
    from splitveil import config_from_dict
    from splitveil.attacks.base import mean_image_baseline
    from splitveil.data import build_data
    cfg = config_from_dict(base_tree(args), [])
    return mean_image_baseline(build_data(cfg.data, cfg.seed))["mse"]


def write_table(args) -> None:
    base = baseline_mse(args)
    lines = ["# Attack strength against budget (issue 10)", "",
             f"CPU budget (2 shared cores, labelled): CIFAR-10, train {args.train_size}, test {args.test_size}, "
             f"aux {args.aux_size}, target {args.target_epochs} epochs; cuts {CUTS}. Test MSE per budget factor "
             "(x default), the attack's seconds (fit, plus inversion for rMLE; 'wall': the whole cell) in brackets, on "
             "shared cores: not speed numbers. 'not run': not measured in the time available. The mean-image baseline "
             f"(the mean aux image for every test image) has test MSE {base:.5f}; a default above it is marked 'weak'.", "",
             "| cut | defense | attack | x0.25 | x0.5 | x1 (default) | x2 | default within 5% of x2 |",
             "|---|---|---|---|---|---|---|---|"]
    for c in CUTS:
        for d in DEFENSES:
            for a in ATTACKS:
                vals = {}
                for f in FACTORS:
                    p = cell_path(args, c, d, a, f)
                    vals[f] = json.loads(p.read_text()) if p.exists() else None
                cellstr = [f"{v['mse']:.5f} ({seconds(v)})" if v else "not run" for v in vals.values()]
                ok = (f"{'yes' if vals[1.0]['mse'] <= 1.05 * vals[2.0]['mse'] else 'NO'}" if vals[1.0] and vals[2.0] else "not run")
                if vals[1.0] and vals[1.0]["mse"] >= base:
                    ok += " (weak: default above the mean-image baseline)"
                lines.append(f"| {c} | {d} | {a} | " + " | ".join(cellstr) + f" | {ok} |")
    lines += ["", "Per cell: optimisation steps, epoch kept by the held-out selection (of the epochs run; rMLE: the TV weight its "
              "feature residual chose), held-out MSE, "
              "target accuracy, threads.", "", "| cut | defense | attack | factor | budget | steps | best epoch (rmle: TV weight chosen) | val mse | test mse | seconds | target acc |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c, d, a, f in cells():
        p = cell_path(args, c, d, a, f)
        if p.exists():
            v = json.loads(p.read_text())
            tv = f"TV {v['fit.tv_weight']:g}" if v.get("fit.tv_weight") is not None else ""
            lines.append(f"| {c} | {d} | {a} | {f} | {v['budget']} | {v.get('fit.steps', '')} | {v.get('fit.best_epoch', tv)} | "
                         f"{v.get('fit.val_mse', float('nan')):.5f} | {v['mse']:.5f} | {seconds(v)} | {v['accuracy']:.3f} |")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print(OUT.read_text())


def speed(args) -> None:
    """Attack-fit speed of the default decoder by precision (issue 12), interleaved in one process: for each round
    and precision, fits with ``max_steps`` S_short and S_long on the cached shallow undefended target; the
    per-step time is (t_long - t_short) / (S_long - S_short) (setup excluded), the median over rounds."""
    import platform
    import statistics
    from splitveil.attacks.inverse_network import InverseNetworkAttack, InverseNetworkParams
    from splitveil.precision import MixedPrecision
    data, edge, _ = target(args, "shallow", "none")
    s_short, s_long = 4, 4 + args.speed_steps
    variants = [("fp32", False), ("auto", "auto")]
    times: dict[str, list[float]] = {v[0]: [] for v in variants}
    for r in range(args.speed_rounds + 1):      # round 0: warm-up, discarded
        for prec, cl in variants:
            t = []
            for steps in (s_short, s_long):
                a = InverseNetworkAttack(InverseNetworkParams(epochs=1000, max_steps=steps, precision=prec, channels_last=cl,
                                                              val_fraction=0.0), seed=1, show_progress=False)
                t0 = time.perf_counter()
                a.fit(edge, data)
                t.append(time.perf_counter() - t0)
            if r:
                times[prec].append((t[1] - t[0]) / (s_long - s_short))
    auto = MixedPrecision.create("auto", "auto", "cpu").info()
    bs = InverseNetworkParams().batch_size
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = ["", "## Attack fit (issue 12): default inverse_network decoder, auto vs fp32", "",
             f"`flock /tmp/splitveil-heavy.lock python benchmarks/attack_strength.py --speed --threads {args.threads}`: "
             f"the default residual decoder on the shallow (conv2, 8x8x8 features) undefended CIFAR-10 target, batch {bs}, "
             f"{args.threads} thread(s), per-step time = (fit of {s_long} steps - fit of {s_short} steps) / {s_long - s_short}, "
             f"variants interleaved in one process, median of {args.speed_rounds} rounds (one warm-up round discarded). "
             f"auto resolved to {auto}. CPU: {platform.processor() or platform.machine()}; "
             f"load at start {open('/proc/loadavg').read().split()[:3]} (a shared 2-core machine: absolute times are loaded, "
             "the ratio is interleaved).", "",
             "| precision | step ms | images/s | speed-up vs fp32 |", "|---|---|---|---|"]
    for k in times:
        lines.append(f"| {k} | {1000 * med[k]:.0f} | {bs / med[k]:.0f} | {med['fp32'] / med[k]:.2f}x |")
    lines.append("")
    lines.append("Per-round step ms: " + "; ".join(f"{k}: {[round(1000 * x) for x in v]}" for k, v in times.items()))
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "benchmarks" / "results" / "throughput.md"
    with out.open("a") as f:
        f.write(text)


def yaml_value(text: str):
    import yaml
    return yaml.safe_load(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", type=int, action="append", help="cell number(s) to run (see --list)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--rerun", action="store_true", help="re-run cells that are cached already")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--train-size", type=int, default=3000)
    ap.add_argument("--test-size", type=int, default=300)
    ap.add_argument("--aux-size", type=int, default=1000)
    ap.add_argument("--target-epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", type=lambda kv: (kv.split("=", 1)[0], yaml_value(kv.split("=", 1)[1])), action="append",
                    help="KEY=VALUE attack parameter override for every cell of this call (e.g. precision=fp32)")
    ap.add_argument("--speed", action="store_true", help="attack-fit speed, auto vs fp32 (appends to results/throughput.md)")
    ap.add_argument("--speed-steps", type=int, default=12)
    ap.add_argument("--speed-rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.list:
        for i, c in enumerate(cells()):
            done = cell_path(args, *c).exists()
            print(i, *c, "done" if done else "")
    for i in args.part or []:
        c = cells()[i]
        if cell_path(args, *c).exists() and not args.rerun:
            print("done already:", *c)
            continue
        t = time.perf_counter()
        row = run_cell(args, *c)
        row["wall_s"] = time.perf_counter() - t     # the whole cell: target (cached) + fit + scoring
        cell_path(args, *c).parent.mkdir(parents=True, exist_ok=True)
        cell_path(args, *c).write_text(json.dumps(row))
        print(row, f"{time.perf_counter() - t:.0f}s")
    if args.speed:
        speed(args)
    if args.table or args.part:
        write_table(args)


if __name__ == "__main__":
    main()
