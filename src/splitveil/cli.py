"""The command line: ``splitveil <command> ...``. Each command lives in ``splitveil/commands/<name>.py``.

Building the parser imports no torch (commands import what they need when they run), so ``--help`` is fast."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from .commands import COMMANDS
from .params import ConfigError, CorruptFileError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitveil", description="Privacy of split inference against model inversion.")
    from .version import __version__

    parser.add_argument("--version", action="version", version=f"splitveil {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        cmd = COMMANDS.get(name)
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(handler=cmd.handler)
    return parser


def _sigterm(signum, frame):  # `kill PID` (SIGTERM) stops a run like Ctrl-C: it is marked interrupted
    raise KeyboardInterrupt


def _error_class(e: BaseException, name: str) -> bool:
    return any(c.__name__ == name for c in type(e).__mro__)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    plugins_env = os.environ.get("SPLITVEIL_ALLOW_PLUGINS")
    if getattr(args, "allow_plugins", False):   # inherited by sweep worker processes
        os.environ["SPLITVEIL_ALLOW_PLUGINS"] = "1"
    try:
        previous = signal.signal(signal.SIGTERM, _sigterm)
    except ValueError:  # not the main thread (e.g. called from a test thread)
        previous = None
    try:
        return int(args.handler(args) or 0)
    except ConfigError as e:
        print(f"splitveil: config error: {e}", file=sys.stderr)
        return 2
    except CorruptFileError as e:
        print(f"splitveil: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"splitveil: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("splitveil: interrupted; finished work is kept: run the same command again to continue",
              file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `splitveil list models | head -1`
        try:
            fd = os.open(os.devnull, os.O_WRONLY)
            os.dup2(fd, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141
    except Exception as e:  # errors with a message meant for the user, without a traceback
        if _error_class(e, "NonFiniteLossError") or _error_class(e, "RunBusyError"):
            print(f"splitveil: {e}", file=sys.stderr)
            return 1
        if _error_class(e, "DiskFullError"):   # the run is recorded failed and resumes from its checkpoints
            print(f"splitveil: {e.strerror if isinstance(e, OSError) and e.strerror else e}", file=sys.stderr)
            return 1
        raise
    finally:
        if plugins_env is None:   # main() called in-process (tests, scripts) leaves the environment as it was
            os.environ.pop("SPLITVEIL_ALLOW_PLUGINS", None)
        else:
            os.environ["SPLITVEIL_ALLOW_PLUGINS"] = plugins_env
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
