"""``splitveil sweep SWEEP.yaml``: run every point of a sweep (local worker processes or Ray), skipping finished
points and resuming interrupted ones; a live progress line shows done / running / failed / remaining and ETA."""
from __future__ import annotations

import sys

from . import add_plugin_argument, command, overrides_from_args


@command("sweep", "run a sweep (base config x grid/list of overrides) with local worker processes or Ray")
class SweepCommand:
    @staticmethod
    def add_arguments(p) -> None:
        p.add_argument("sweep", help="sweep YAML file (see sweeps/ and docs/sweeps.md)")
        p.add_argument("--backend", choices=["local", "ray"], default="local", help="local processes (default) or ray")
        p.add_argument("--workers", type=int, default=1, help="local backend: worker processes (default 1)")
        p.add_argument("--address", help="ray backend: address of an existing cluster (default: start a local one)")
        p.add_argument("--num-cpus", type=int, help="ray backend, local cluster: CPUs to give it (default: all cores)")
        p.add_argument("--num-gpus", type=int, help="ray backend, local cluster: GPUs to give it (default: detected)")
        p.add_argument("--cpus-per-run", type=float, help="ray backend: CPU request of each run (default: the file's resources.cpus)")
        p.add_argument("--gpus-per-run", type=float, help="ray backend: GPU request of each run (default: the file's resources.gpus)")
        p.add_argument("--out", help="folder of run folders and results.sqlite (default: the file's `out`, else runs/<name>)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                       help="override a config field in every point, e.g. --set train.epochs=1 (repeatable)")
        p.add_argument("--data-root", help="data root for every point, sets data.root")
        p.add_argument("--device", help="auto | cpu | cuda for every point, sets device")
        p.add_argument("--force", action="store_true", help="re-run every point, even finished ones")
        p.add_argument("--dry-run", action="store_true", help="list the points and their status, with an ESTIMATED run "
                       "time per point on this machine from a short measured calibration; run nothing")
        p.add_argument("--no-estimate", action="store_true", help="--dry-run: skip the calibration and the estimate")
        p.add_argument("--calibration-steps", type=int, default=3, metavar="N",
                       help="--dry-run: timed training steps per distinct model / attack (default 3)")
        p.add_argument("--no-progress", action="store_true", help="no live progress line")
        p.add_argument("--report", action="store_true", help="write the html/md/csv/latex report when the sweep ends")
        add_plugin_argument(p)

    @staticmethod
    def handler(args) -> int:
        from ..experiments.sweep import describe, load_sweep, run_sweep
        from ..params import ConfigError

        overrides = overrides_from_args(args, ("data_root", "device"))
        if args.workers < 1:
            raise ConfigError("--workers: must be >= 1")
        sweep = load_sweep(args.sweep, overrides, args.out)
        from ..experiments.run import check_out

        check_out(sweep.out, "--out" if args.out else f"{args.sweep}: out")
        if args.dry_run:
            from ..experiments.sweep import check_points

            print(describe(sweep))
            bad = check_points(sweep)
            if bad:
                print(f"\n{len(bad)} point(s) invalid: fix them before running", file=sys.stderr)
                return 2
            if not args.no_estimate and sweep.points:
                from ..experiments.sweep.estimate import estimate_lines

                print()
                print("\n".join(estimate_lines(sweep.points, steps=args.calibration_steps)))
            return 0
        res = run_sweep(sweep, backend=args.backend, workers=args.workers, force=args.force,
                        progress=not args.no_progress, address=args.address, num_cpus=args.num_cpus,
                        num_gpus=args.num_gpus, cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run)
        total_run = sum(res.run_seconds.values())
        print(f"sweep {res.name}: {len(res.skipped) + len(res.finished)}/{res.total} finished "
              f"({len(res.skipped)} already done, {len(res.finished)} now), {len(res.failed)} failed, "
              f"{len(res.lost)} not finished")
        if res.run_seconds:
            eff = res.efficiency
            print(f"wall {res.wall_s:.1f} s, sum of run times {total_run:.1f} s, {res.slots} parallel slots, "
                  f"parallel efficiency {eff:.0%}" if eff is not None else "")
        if res.worker_deaths:
            print(f"{res.worker_deaths} worker process(es) died (killed or out of memory); each was replaced and "
                  f"its point resumed")
        for rid, err in res.failed.items():
            print(f"failed: {rid}: {err}")
        for rid, err in res.lost.items():
            print(f"not finished: {rid}: {err}")
        print(f"results in {sweep.out} (splitveil report {sweep.out} --format html)")
        if args.report and (res.finished or res.skipped):
            from ..report.build import build_report

            written = build_report(sweep.out, ["md", "csv", "latex", "html"])
            for path in written.values():
                print(f"wrote {path}")
        return 0 if res.complete else 1
