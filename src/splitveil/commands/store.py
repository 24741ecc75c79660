"""``splitveil store rebuild OUT``: rebuild a runs folder's results.sqlite from its run folders."""
from __future__ import annotations

import sys

from . import command


@command("store", "maintain a runs folder's results store: `store rebuild OUT` restores it from the run folders")
class StoreCommand:
    @staticmethod
    def add_arguments(p) -> None:
        p.add_argument("action", choices=["rebuild"],
                       help="rebuild: a new results.sqlite from every run folder's config.yaml and metrics.json "
                            "(finished runs as finished, the others as interrupted, so that they resume); the old "
                            "store is moved aside as results.sqlite.corrupt-<time>")
        p.add_argument("out", help="the runs folder (the --out of `splitveil run` / `sweep`)")

    @staticmethod
    def handler(args) -> int:
        from ..results.store import rebuild_store

        res = rebuild_store(args.out)
        if res["moved"]:
            print(f"moved the old store to {res['moved']}")
        print(f"rebuilt {res['store']}: {res['finished']} finished run(s), {res['interrupted']} not finished "
              f"(kept as interrupted: a rerun resumes them)")
        for folder, why in res["skipped"].items():
            print(f"skipped {folder}: {why}", file=sys.stderr)
        return 0
