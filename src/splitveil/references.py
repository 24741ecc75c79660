"""``module:function`` references to the user's own code (a model factory, a dataset), imported on demand.

A config may name ``model.name: "mypkg.models:make_net"`` or ``data.name: "mypkg.data:load"`` instead of a
registered name: the module is imported (like a ``plugins:`` entry, and only when plug-ins are allowed, with
``--allow-plugins`` or ``splitveil.allow_plugins()``: a config that names code runs it) and the attribute after
the colon is returned."""
from __future__ import annotations

import importlib
import re
from typing import Any

from .params import ConfigError

_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def is_reference(name: Any) -> bool:
    """``True`` for ``package.module:attribute`` (a registered name never holds a colon)."""
    return isinstance(name, str) and bool(_REF.match(name.strip()))


def import_reference(ref: str, field: str) -> Any:
    """The object ``ref`` (``module:attr.sub``) names; a ConfigError naming ``field`` when it cannot be found."""
    if not is_reference(ref):
        raise ConfigError(f"{field}: {ref!r} is not a 'module:function' reference (e.g. mypkg.models:make_net)")
    mod_name, attr = ref.strip().split(":", 1)
    from .registry import load_plugins

    load_plugins([mod_name], field)   # the same import, and the same permission (--allow-plugins), as plugins:
    obj: Any = importlib.import_module(mod_name)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{field}: module '{mod_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    return obj
