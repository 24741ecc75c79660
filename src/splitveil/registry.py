"""A tiny name -> constructor registry shared by datasets, models, defenses and attacks."""
from __future__ import annotations

from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar

from .params import ConfigError, coerce, did_you_mean  # noqa: F401  (did_you_mean: re-exported)

T = TypeVar("T")


class UnknownNameError(ConfigError, KeyError):
    """A name that no registry entry has (a ConfigError, and a KeyError for code that catches those)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""




class Registry(Generic[T]):
    """Maps registry names to objects (classes or factories) with a one-line description each.

    A plug-in's name is written once: ``@DEFENSES.register("my_noise", "one line")`` also sets the class's
    ``name`` attribute (a class that spells its own ``name`` differently is refused). Names from installed
    packages' entry points (group ``splitveil.plugins``) are loaded the first time a registry is asked for a
    name it does not have, or for its list."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._docs: dict[str, str] = {}

    def register(self, name: str | None = None, description: str | None = None) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            key = name if name is not None else getattr(obj, "name", "")
            if not key or not isinstance(key, str):
                raise ValueError(f"{self.kind} {obj!r}: register it under a name, e.g. @register(\"my_{self.kind}\")")
            if isinstance(obj, type) and hasattr(obj, "name"):
                own = obj.__dict__.get("name")
                if own and own != key:
                    raise ValueError(f"{self.kind} class {obj.__qualname__} says name = {own!r} but is registered "
                                     f"as {key!r}; write the name once, in register()")
            old = self._items.get(key)
            if old is not None and old is not obj and not _same_definition(old, obj):
                raise ValueError(f"{self.kind} '{key}' is registered twice ({_where(old)} and {_where(obj)})")
            if isinstance(obj, type) and hasattr(obj, "name"):
                obj.name = key  # type: ignore[attr-defined]
            self._items[key] = obj
            doc = description or (obj.__doc__ or "").strip().splitlines()[0:1]
            self._docs[key] = doc if isinstance(doc, str) else (doc[0] if doc else "")
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            load_entry_points()
        if name not in self._items:
            raise UnknownNameError(self.unknown(name))
        return self._items[name]

    def unknown(self, name: str) -> str:
        """The message for an unknown ``name``: a close match, then every registered name (once)."""
        known = self.names()
        return f"unknown {self.kind} '{name}'{did_you_mean(name, known)}; registered: {', '.join(known) or '(none)'}"

    def create(self, name: str, params: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """``cls(validated params, **kwargs)`` for a registered class with a ``Params`` dataclass."""
        cls: Any = self.get(name)
        return cls(coerce(cls.Params, dict(params or {}), f"{self.kind}.{name}"), **kwargs)

    def describe(self) -> dict[str, str]:
        load_entry_points()
        return {k: self._docs[k] for k in sorted(self._items)}

    def __contains__(self, name: object) -> bool:
        if name not in self._items:
            load_entry_points()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def names(self) -> list[str]:
        load_entry_points()
        return sorted(self._items)


def _where(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def _same_definition(a: Any, b: Any) -> bool:
    """The same class or function defined again (a plug-in module imported a second time)."""
    return _where(a) == _where(b)


# -- plug-ins from the user's own code ---------------------------------------------------------------------
PLUGIN_GROUP = "splitveil.plugins"
_entry_points_loaded = False
_plugins_loaded: dict[str, str] = {}   # module or entry point -> how it was loaded


def load_entry_points() -> list[str]:
    """Load (once per process) every entry point of group ``splitveil.plugins`` of the installed packages.

    An entry point names a module whose import registers plug-ins (``my_pkg.splitveil_plugin``) or a function
    called once to register them (``my_pkg.plugin:register``). A plug-in that fails to load is an error
    naming it, not a silently missing name."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return []
    _entry_points_loaded = True   # first: a plug-in that looks names up while loading does not recurse
    import inspect
    from importlib.metadata import entry_points

    loaded = []
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            obj = ep.load()
            if inspect.isfunction(obj):
                obj()
        except Exception as e:
            raise ConfigError(f"plug-in entry point '{ep.name} = {ep.value}' (group {PLUGIN_GROUP}) failed to "
                              f"load: {type(e).__name__}: {e}") from e
        _plugins_loaded[ep.value] = "entry point"
        loaded.append(ep.value)
    return loaded


PLUGINS_ENV = "SPLITVEIL_ALLOW_PLUGINS"   # "1": plug-in modules named in configs may be imported (inherited by workers)


def allow_plugins(allow: bool = True) -> None:
    """Allow (or forbid again) importing the plug-in modules that configs and sweep files name (``plugins:``,
    ``model.name: module:function``). Importing a module runs its code, so a config from someone else next to
    a ``.py`` file could run anything: this is the explicit opt-in, the Python side of ``--allow-plugins``.
    It sets ``SPLITVEIL_ALLOW_PLUGINS=1`` in this process's environment, which sweep worker processes started
    afterwards inherit. Entry points of installed packages load without it."""
    import os

    if allow:
        os.environ[PLUGINS_ENV] = "1"
    else:
        os.environ.pop(PLUGINS_ENV, None)


def plugins_allowed() -> bool:
    """Whether plug-in modules named in configs may be imported (``SPLITVEIL_ALLOW_PLUGINS`` is 1/true/yes)."""
    import os

    return os.environ.get(PLUGINS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def require_plugin_permission(modules: list[str], field: str = "plugins") -> None:
    """A ConfigError naming ``field``, the modules and the flag unless plug-ins are allowed (a module already
    loaded as a plug-in in this process is not imported again, so it needs no permission)."""
    pending = [m for m in modules if m not in _plugins_loaded]
    if pending and not plugins_allowed():
        raise ConfigError(f"{field}: refusing to import the plug-in module(s) {', '.join(repr(m) for m in pending)}: "
                          f"importing a module runs its code, and a config can come from anyone. If you trust this "
                          f"config and these modules, pass --allow-plugins (Python: splitveil.allow_plugins(); "
                          f"environment: {PLUGINS_ENV}=1). Plug-ins of installed packages (entry points of group "
                          f"{PLUGIN_GROUP}) load without it")


def load_plugins(modules: list[str] | tuple[str, ...] = (), field: str = "plugins") -> list[str]:
    """Import the user's plug-in modules (a config's ``plugins:`` list) so that their ``register`` decorators
    run; a module is imported once per process however often it is listed. Only when plug-ins are allowed
    (:func:`allow_plugins`, ``--allow-plugins``): otherwise a ConfigError names the modules before any is
    imported. Entry points load too (always)."""
    names = []
    for i, mod in enumerate(modules):
        if not isinstance(mod, str) or not mod.strip():
            raise ConfigError(f"{field}[{i}]: expected an importable module name, got {mod!r}")
        names.append(mod.strip())
    require_plugin_permission(names, field)
    load_entry_points()
    out = []
    for i, mod in enumerate(names):
        if mod not in _plugins_loaded:
            try:
                _import_with_cwd(mod)
            except ImportError as e:
                raise ConfigError(f"{field}[{i}]: cannot import plug-in module '{mod}' ({e}); it must be importable "
                                  "from the current directory or the Python path") from None
            _plugins_loaded[mod] = "plugins"
        out.append(mod)
    return out


def _import_with_cwd(module: str):
    """Import ``module`` with the current directory on ``sys.path`` for this import, as ``python -m`` has it: the
    ``splitveil`` console script does not put it there, and a plug-in module beside the config must load the same
    way under both. The path is restored afterwards (modules imported by the plug-in stay imported)."""
    import importlib
    import os
    import sys

    added = False
    cwd = os.getcwd()
    if not any(p in ("", ".", cwd) for p in sys.path):
        sys.path.insert(0, cwd)
        added = True
    try:
        return importlib.import_module(module)
    finally:
        if added:
            try:
                sys.path.remove(cwd)
            except ValueError:
                pass


def import_submodules(package_name: str) -> None:
    """Import every module of a package so that their @register decorators run.

    New defenses/attacks/models only need a new file: no central list to edit.
    """
    import importlib
    import pkgutil

    pkg = importlib.import_module(package_name)
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package_name}.{info.name}")

