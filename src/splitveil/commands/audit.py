"""``splitveil audit``: how much a trained model leaks at each cut, without training it again."""
from __future__ import annotations

from . import command, overrides_from_args


@command("audit", "attack a trained model (a run folder, or module:function + a state dict) at one or more cuts, "
                  "without training; records each cut like a run and prints the audit table")
class AuditCommand:
    @staticmethod
    def add_arguments(p) -> None:
        p.add_argument("run", nargs="?", help="a finished run's folder (its config.yaml and checkpoint.pt), or "
                                                "runs/<config name>: the one run of that name there")
        p.add_argument("--cuts", help="cut names or 1-based block indices, comma-separated, or 'all' (default: the "
                                      "trained cut; `splitveil blocks` lists them)")
        p.add_argument("--config", help="without a run folder: the config giving data, defense and attacks")
        p.add_argument("--model", help="without a run folder: the model, a registered name or module:function "
                                       "(sets model.name)")
        p.add_argument("--weights", help="without a run folder: the model's state dict (loaded weights_only)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                       help="override a config field, e.g. --set 'attacks={inverse_network: {epochs: 5}}'")
        p.add_argument("--out", help="where the cut folders, results.sqlite and the table go (default: the run's "
                                     "own runs folder; without a run folder: runs)")
        p.add_argument("--device", help="auto | cpu | cuda (default: cpu for a run folder, the config's otherwise)")
        p.add_argument("--data-root", help="sets data.root")
        p.add_argument("--force", action="store_true", help="audit again cuts already audited")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.add_argument("--allow-plugins", action="store_true",
                       help="import the modules the config names (plugins:, model.name: module:function)")

    @staticmethod
    def handler(args) -> int:
        from pathlib import Path

        from ..experiments.audit import audit_table, from_run, from_weights, run_audit
        from ..experiments.config import load_config
        from ..params import ConfigError

        ov = overrides_from_args(args, ("data_root", "no_progress"))
        if args.run:
            if args.config or args.weights or args.model:
                raise ConfigError("audit: give a run folder, or --config with --weights (and --model), not both")
            tr = from_run(args.run, ov, args.device or "cpu")
            out = Path(args.out) if args.out else tr.run_dir.resolve().parent
        else:
            if not (args.config and args.weights):
                raise ConfigError("audit: give a run folder, or --config CONFIG --weights STATE_DICT [--model "
                                  "module:function]")
            if args.model:
                ov.append(f"model.name={args.model}")
            if args.device:
                ov.append(f"device={args.device}")
            tr = from_weights(load_config(args.config, ov), args.weights)
            out = Path(args.out or "runs")
        summary = run_audit(tr, args.cuts, out, force=args.force)
        print(audit_table(summary))
        print(f"\naudit in {summary['dir']} (one run folder per cut in {out})")
        return 0
