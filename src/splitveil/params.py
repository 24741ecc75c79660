"""Typed parameter blocks: turn plain mappings (YAML, --set) into dataclasses with clear errors.

Every configurable component (dataset, model, train, defense, attack) declares its parameters as a
dataclass; :func:`coerce` validates a mapping against it and names the offending field on error.
"""
from __future__ import annotations

import dataclasses
import keyword
import math
import types
import typing
from typing import Any, Mapping


class ConfigError(ValueError):
    """A configuration field is unknown or has a bad value. The message names the field."""


class CorruptFileError(RuntimeError):
    """A file splitveil wrote (checkpoint, attacks.json, results store, image) cannot be read; the message
    names the file and what to do."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce_value(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce_value(a, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: {value!r} matches none of {[_type_name(a) for a in args]}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        out = [_coerce_value(inner, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    from_config = getattr(tp, "from_config", None) if isinstance(tp, type) else None
    if from_config is not None:   # a typed block that validates itself (the defense and attack specs)
        return from_config(value, path)
    if dataclasses.is_dataclass(tp):
        return coerce(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            v = float(value)
        elif isinstance(value, str):
            try:
                v = float(value)
            except ValueError:
                raise ConfigError(f"{path}: expected a number, got {value!r}") from None
        else:
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(v):
            raise ConfigError(f"{path}: {value!r} is not a finite number")
        return v
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    return value


def coerce(cls: type, data: Mapping[str, Any] | None, path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad values raise :class:`ConfigError`."""
    if data is None:
        data = {}
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    # a field named after a Python keyword is spelled with a trailing underscore (``lambda_``) and is
    # given in configs under the keyword itself (``lambda: 0.5``)
    data = {(k + "_" if keyword.iskeyword(k) and k + "_" in fields else k): v for k, v in data.items()}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f"{path}." if path else ""
        valid = sorted(n[:-1] if n.endswith("_") and keyword.iskeyword(n[:-1]) else n for n in fields)
        raise ConfigError(
            f"unknown field '{where}{unknown[0]}'{did_you_mean(unknown[0], valid)}; valid fields: {', '.join(valid)}"
        )
    kwargs = {}
    for k, v in data.items():
        kwargs[k] = _coerce_value(hints[k], v, f"{path}.{k}" if path else k)
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        try:
            check()
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    return obj


def did_you_mean(name: str, known: list[str]) -> str:
    """`` (did you mean 'x'?)`` for a close known name (``train.epoch`` -> ``epochs``), else ''."""
    import difflib

    close = difflib.get_close_matches(str(name), known, n=2, cutoff=0.6)
    if not close and known:  # a prefix, e.g. vgg11 -> vgg11_bn
        close = [k for k in known if k.startswith(str(name)) or str(name).startswith(k)][:2]
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def field_names(cls: type) -> set[str]:
    """Init field names, plus the keyword spelling of fields like ``lambda_`` (given as ``lambda``)."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return names | {n[:-1] for n in names if n.endswith("_") and keyword.iskeyword(n[:-1])}


def require(cond: bool, field: str, message: str) -> None:
    """Raise a ConfigError naming ``field`` unless ``cond`` holds (used in ``validate`` methods)."""
    if not cond:
        raise ConfigError(f"{field}: {message}")


@dataclasses.dataclass
class NoParams:
    """Parameter block of a component that takes none."""


def params_from(cls: type, params: Any, values: Mapping[str, Any], path: str, factory: str) -> Any:
    """The validated ``cls.Params`` of a component built as ``cls(params)`` or ``cls(**values)``."""
    if values:
        if params is not None:
            raise TypeError(f"{cls.__name__}: give the parameters either as one Params object or as keywords, "
                            f"not both (or use {factory}(name, **params))")
        params = dict(values)
    if params is None:
        return cls.Params()
    if isinstance(params, Mapping):
        return coerce(cls.Params, params, path)
    return params   # a Params object (or a compatible one: the caller's choice)
