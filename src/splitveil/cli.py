"""The command line: ``splitveil <command> ...``. Each command lives in ``splitveil/commands/<name>.py``."""
from __future__ import annotations

import argparse
import logging
import sys

from .commands import COMMANDS
from .params import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitveil", description="Privacy of split inference against model inversion.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"splitveil {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        cmd = COMMANDS.get(name)
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(handler=cmd.handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except ConfigError as e:
        print(f"splitveil: config error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"splitveil: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("splitveil: interrupted; finished work is kept (re-run with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
