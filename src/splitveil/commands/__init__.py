"""CLI commands: each module registers one with ``@command``; the parser is built from the registry."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..registry import Registry, import_submodules


@dataclass
class Command:
    help: str
    add_arguments: Callable
    handler: Callable


COMMANDS: Registry[Command] = Registry("command")


def command(name: str, help: str):
    """Register ``cls`` with static ``add_arguments(parser)`` and ``handler(args)`` as a sub-command."""
    def deco(cls):
        COMMANDS.register(name, help)(Command(help, cls.add_arguments, cls.handler))
        return cls
    return deco


def add_config_arguments(p) -> None:
    """Arguments shared by every command that takes a run config."""
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any config field, e.g. --set defense.sigma=0.05 (repeatable)")
    p.add_argument("--data-root", help="data root, sets data.root (e.g. ../shared/data)")
    p.add_argument("--device", help="auto | cpu | cuda, sets device")
    p.add_argument("--seed", type=int, help="sets seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_plugin_argument(p)


def add_plugin_argument(p) -> None:
    """``--allow-plugins``: every command that reads a config or a sweep file takes it."""
    p.add_argument("--allow-plugins", action="store_true",
                   help="import the plug-in modules the config names (plugins:, model.name: module:function); "
                        "importing runs their code, so only for configs you trust (sets SPLITVEIL_ALLOW_PLUGINS=1 "
                        "for worker processes). Installed packages' entry points need no flag")


FLAG_OVERRIDES = ("data_root", "device", "seed", "no_progress")


def overrides_from_args(args, flags: tuple[str, ...] = FLAG_OVERRIDES) -> list[str]:
    """``--set`` overrides followed by the ones the command-line ``flags`` stand for (``--data-root`` ->
    data.root, ``--device``, ``--seed``, ``--no-progress`` -> progress=false), for the flags a command takes."""
    overrides = list(args.overrides)
    if "data_root" in flags and args.data_root:
        overrides.append(f"data.root={args.data_root}")
    if "device" in flags and args.device:
        overrides.append(f"device={args.device}")
    if "seed" in flags and args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if "no_progress" in flags and args.no_progress:
        overrides.append("progress=false")
    return overrides


def config_from_args(args):
    from ..experiments import load_config

    return load_config(args.config, overrides_from_args(args))


import_submodules(__name__)
