"""``splitveil report RESULTS``: a markdown table of every recorded run, plus report.md / report.csv.

With ``--format md|html|csv|latex`` (repeatable or comma-separated, or ``all``): tables grouped by dataset and
defense with mean +- std over seeds, the equal-utility privacy gain over a reference defense
(``--reference``, default gaussian_noise when it was swept), the accuracy-vs-MSE trade-off with the
reference frontier, privacy vs edge cost, ablation plots of the swept parameters and reconstruction grids
per defense (see docs/reports.md)."""
from __future__ import annotations

from . import command


@command("report", "print a markdown table of all recorded runs and write report.md / report.csv beside them; "
                   "--format md|html|csv|latex for the grouped report with figures")
class ReportCommand:
    @staticmethod
    def add_arguments(p) -> None:
        p.add_argument("results", help="a runs folder (holding results.sqlite) or the .sqlite file")
        p.add_argument("--format", dest="formats", action="append", default=[], metavar="FMT",
                       help="md, html, csv, latex or all (repeatable or comma-separated); without it (and without "
                            "--reference): only the per-run table, printed and written to report.md / report.csv")
        p.add_argument("--out", help="folder for the report files (default: beside the store)")
        p.add_argument("--attack", help="privacy axis: 'worst' (default: the worst case over the attack suite, the "
                                        "attack named per row) or one attack's name")
        p.add_argument("--reference", dest="references", action="append", default=None, metavar="DEFENSE",
                       help="defense label whose swept frontier the equal-utility gain is measured against (repeatable; "
                            "e.g. gaussian_noise, gaussian_noise+cem_gmm; 'none' for no gain table). Default: "
                            "gaussian_noise when it was run at >= 2 settings. Implies --format md when no format is given")
        p.add_argument("--interval", choices=["t", "bootstrap"], default="t",
                       help="gain intervals: t over seeds, paired by seed (default), or the former percentile "
                            "bootstrap (too narrow with 3 seeds; see docs/reports.md)")
        p.add_argument("--bootstrap", type=int, default=2000, metavar="N",
                       help="--interval bootstrap: replicates per gain interval (default 2000; 0: no intervals)")
        p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")

    @staticmethod
    def handler(args) -> int:
        from ..params import ConfigError
        from ..report import write_report

        if args.bootstrap < 0:
            raise ConfigError("--bootstrap: must be >= 0")
        if not args.formats and args.references:
            args.formats = ["md"]
        if not args.formats:
            md, md_path, csv_path = write_report(args.results)
            print(md)
            print(f"wrote {md_path} and {csv_path}")
            return 0
        from ..report.build import FORMATS, build_report

        formats: list[str] = []
        for f in args.formats:
            for x in f.split(","):
                x = x.strip().lower()
                x = {"markdown": "md", "tex": "latex", "htm": "html"}.get(x, x)
                if x == "all":
                    formats += [y for y in FORMATS if y not in formats]
                elif x not in FORMATS:
                    raise ConfigError(f"--format: '{x}' is not one of {', '.join(FORMATS)}, all")
                elif x not in formats:
                    formats.append(x)
        try:
            refs = [r.strip() for x in args.references for r in x.split(",") if r.strip()] if args.references else None
            written = build_report(args.results, formats, args.out, args.attack, references=refs,
                                   n_boot=args.bootstrap, seed=args.seed, interval=args.interval)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if "md" in written:
            print(written["md"].read_text())
        for name, path in written.items():
            print(f"wrote {path}")
        return 0
