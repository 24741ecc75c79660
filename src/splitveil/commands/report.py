"""``splitveil report RESULTS``: a markdown table of every recorded run, plus report.md / report.csv."""
from __future__ import annotations

from . import command


@command("report", "print a markdown table of all recorded runs and write report.md / report.csv beside them")
class ReportCommand:
    @staticmethod
    def add_arguments(p) -> None:
        p.add_argument("results", help="a runs folder (holding results.sqlite) or the .sqlite file")

    @staticmethod
    def handler(args) -> int:
        from ..report import write_report

        md, md_path, csv_path = write_report(args.results)
        print(md)
        print(f"wrote {md_path} and {csv_path}")
        return 0
