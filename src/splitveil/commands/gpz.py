"""``splitveil gpz CONFIG``: the Golden Partition Zone sweep over every cut of one trained model, and
``splitveil probe CONFIG --cut N``: the probe values of one cut, without an attack."""
from __future__ import annotations

from . import add_config_arguments, command, config_from_args


def _common(p) -> None:
    add_config_arguments(p)
    p.add_argument("--out", default="runs", help="folder of gpz-<run-id>/ sweep folders (default: runs)")
    p.add_argument("--probe-images", type=int, default=1000,
                   help="test images whose features the probe uses (default 1000)")
    p.add_argument("--bootstrap", type=int, default=200,
                   help="stratified bootstrap resamples of the probe images for the R_c^2 and zone intervals "
                        "(default 200; 0: none)")


def _checked(args, cuts: str, field: str):
    """The config, with ``--out`` and the cuts checked before any work (the model is built, not trained, to
    know its blocks): a bad value is a ConfigError naming ``field``."""
    import torch

    from ..data import DATASETS
    from ..experiments.gpz import parse_cuts
    from ..experiments.run import check_device, check_out
    from ..models import create_model
    from ..params import ConfigError

    check_out(args.out)
    cfg = config_from_args(args)
    check_device(cfg.device)
    info = DATASETS.get(cfg.data.name)
    size = cfg.data.image_size or info.default_image_size
    shape = (cfg.data.channels or info.channels or 3, size, size)
    with torch.random.fork_rng(devices=[]):
        names = create_model(cfg.model.name, info.num_classes or 10, shape, cfg.model.width,
                             **cfg.model.options).block_names
    try:
        parse_cuts(cuts, names)
    except ConfigError as e:
        raise ConfigError(str(e).replace("--cuts:", f"{field}:", 1)) from None
    return cfg


def gpz_lock(out, cfg, kind: str = "gpz"):
    """The run lock (``results.store.run_lock``, the one ``splitveil run`` takes) on the sweep's folder
    ``<out>/gpz-<run-id>``: a second gpz / probe of the same config in the same ``--out`` is refused with a clear
    RunBusyError instead of writing the same checkpoint."""
    from ..results.store import run_lock

    return run_lock(out, f"{kind}-{cfg.run_id()}")


@command("gpz", "Golden Partition Zone sweep: probe (R_c^2, entropy bounds, cost) and attack every cut of one model")
class GPZCommand:
    @staticmethod
    def add_arguments(p) -> None:
        _common(p)
        p.add_argument("--cuts", default="all",
                       help="'all' (default) or a list of cuts, block names and inclusive ranges, e.g. 2,4,6 or "
                            "conv2,conv4 or 8-16 or 8:16 or 2,8-16")
        p.add_argument("--no-attack", action="store_true", help="probe only (no inverse-network attack per cut)")
        p.add_argument("--compare-labels", metavar="FORMS",
                       help="train one model per label form and overlay them, e.g. onehot,ls+0.3,ls-0.05")
        p.add_argument("--seeds", default=None,
                       help="with --compare-labels: seeds, e.g. 0,1,2 (one model per label form and seed; "
                            "default: the config's seed)")
        p.add_argument("--second-zone-gap", type=float, default=None,
                       help="the paper's second-zone rule: a drop of at least this size between the two largest "
                            "R_c^2 drops adds the second zone cut (default 0.2)")

    @staticmethod
    def handler(args) -> int:
        from ..experiments.gpz import SECOND_ZONE_GAP, GPZSweep, run_compare
        from ..report.gpz import markdown_table, write_compare, write_sweep, zone_summary
        from ..params import ConfigError

        if args.probe_images < 2:
            raise ConfigError("--probe-images: must be >= 2")
        cfg = _checked(args, args.cuts, "--cuts")
        gap = SECOND_ZONE_GAP if args.second_zone_gap is None else args.second_zone_gap
        attack = not args.no_attack
        seeds = None
        if args.seeds:
            try:
                seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
            except ValueError:
                raise ConfigError(f"--seeds: expected integers like 0,1,2, got {args.seeds!r}") from None
            if not args.compare_labels:
                raise ConfigError("--seeds: only with --compare-labels (a plain sweep uses the config's seed)")
        if args.compare_labels:
            forms = [f.strip() for f in args.compare_labels.split(",") if f.strip()]
            with gpz_lock(args.out, cfg, "gpz-compare"):
                res = run_compare(cfg, forms, args.out, args.cuts, attack, args.probe_images, seeds, gap, args.bootstrap)
            for per_seed in res["results"].values():
                for r in per_seed.values():
                    write_sweep(r)
            write_compare(res)
            for form, per_seed in res["results"].items():
                for seed, r in per_seed.items():
                    print(f"## {form}, seed {seed}: accuracy {r['accuracy']:.4f}\n\n"
                          f"{markdown_table(r['rows'], r['zone'])}\n\n{zone_summary(r['zone'])}\n")
            print(res["table_md"])
            print(f"comparison in {res['dir']}")
            return 0
        with gpz_lock(args.out, cfg):
            sweep = GPZSweep(cfg, args.out, args.probe_images, args.bootstrap)
            res = sweep.run(args.cuts, attack, gap)
        write_sweep(res)
        print(f"{res['dataset']} {res['model']} ({res['defense']}): test accuracy {res['accuracy']:.4f}\n")
        print(markdown_table(res["rows"], res["zone"]))
        print(f"\n{zone_summary(res['zone'])}")
        for note in res["notes"]:
            print(f"note: {note}")
        print(f"\nresults in {res['run_dir']}")
        return 0


@command("probe", "probe values (d, R_c^2, sigma_feat^2, entropy bounds, cost) of one cut, no attack")
class ProbeCommand:
    @staticmethod
    def add_arguments(p) -> None:
        _common(p)
        p.add_argument("--cut", required=True, help="cut index (blocks on the edge) or block name")

    @staticmethod
    def handler(args) -> int:
        from ..experiments.gpz import GPZSweep, parse_cuts

        cfg = _checked(args, str(args.cut), "--cut")
        with gpz_lock(args.out, cfg):   # the same folder (and checkpoint) as `gpz` with this config
            sweep = GPZSweep(cfg, args.out, args.probe_images, args.bootstrap).prepare()
            (k,) = parse_cuts(str(args.cut), sweep.block_names)
            row = sweep.probe(k)
        print(f"{sweep.data.name} {cfg.model.name} ({sweep.defenses.label}): test accuracy {sweep.accuracy:.4f}")
        print(f"cut {k} ({row['block']}), features {tuple(row['shape'])}, {row['probe_images']} test images\n")
        print("| probe | value |\n|---|---|")
        ci = row.get("rc2_ci95")
        vals = [("d", f"{row['d']:,}"), ("R_c^2 mean", f"{row['rc2_mean']:.6g}"),
                ("R_c^2 mean, bootstrap 95% interval", f"{ci[0]:.6g}..{ci[1]:.6g}" if ci else "-"),
                ("classes in R_c^2 (>= 2 images) / left out", f"{row['rc2_classes']} / {row['rc2_excluded']}"), ("R_c^2 std over classes", f"{row['rc2_std']:.4g}"),
                ("R_c^2 max", f"{row['rc2_max']:.6g}"), ("sigma_feat^2", f"{row['sigma2']:.6g}"),
                ("tr(Sigma)", f"{row['total_variance']:.6g}"),
                ("tr(Sigma), bootstrap 95% interval", f"{row['total_ci95'][0]:.6g}..{row['total_ci95'][1]:.6g}"
                 if row.get("total_ci95") else "-"),
                ("within-class fraction R_c^2 / tr(Sigma) (scale-free)", f"{row['within_fraction']:.4f}"),
                ("within-class fraction, bootstrap 95% interval",
                 f"{row['frac_ci95'][0]:.4f}..{row['frac_ci95'][1]:.4f}" if row.get("frac_ci95") else "-"),
                ("between / within variance", f"{row['between_within']:.4g}"),
                ("d/2 ln(2 pi e sigma_feat^2)", f"{row['h_feat_bound']:.6g}"),
                ("D/2 ln(2 pi e R_c^2/D) + ln K", f"{row['h_dec_bound']:.6g}"),
                ("edge params", f"{row['edge_params']:,} ({100 * row['edge_params_share']:.1f}%)"),
                ("edge FLOPs / image", f"{row['edge_flops']:,} ({100 * row['edge_flops_share']:.1f}%)"),
                ("payload / image (bytes)", f"{row['payload_bytes']:,}")]
        for name, v in vals:
            print(f"| {name} | {v} |")
        print("\nR_c^2 per class: " + ", ".join(f"{c}: {v:.4g}" for c, v in row["rc2_per_class"].items()))
        return 0
