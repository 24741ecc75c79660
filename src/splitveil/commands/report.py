"""``splitveil report RESULTS``: a markdown table of every recorded run, plus report.md / report.csv.

With ``--format md|html|csv|latex`` (repeatable or comma-separated, or ``all``): tables grouped by dataset and
defense with mean +- std over seeds, the accuracy-vs-MSE trade-off with its Pareto front, ablation plots of the
swept parameters and reconstruction grids per defense (see docs/reports.md)."""
from __future__ import annotations

from . import command


@command("report", "print a markdown table of all recorded runs and write report.md / report.csv beside them; "
                   "--format md|html|csv|latex for the grouped report with figures")
class ReportCommand:
    @staticmethod
    def add_arguments(p) -> None:
        p.add_argument("results", help="a runs folder (holding results.sqlite) or the .sqlite file")
        p.add_argument("--format", dest="formats", action="append", default=[], metavar="FMT",
                       help="md, html, csv, latex or all (repeatable or comma-separated); without it: the per-run "
                            "table as before")
        p.add_argument("--out", help="folder for the report files (default: beside the store)")
        p.add_argument("--attack", help="attack whose MSE is the privacy axis (default: inverse_network or the first)")

    @staticmethod
    def handler(args) -> int:
        from ..params import ConfigError
        from ..report import write_report

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
            written = build_report(args.results, formats, args.out, args.attack)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if "md" in written:
            print(written["md"].read_text())
        for name, path in written.items():
            print(f"wrote {path}")
        return 0
