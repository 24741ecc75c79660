"""A restricted unpickler for dataset files in Python's pickle format (the CIFAR-10/100 "python" batches).

``pickle.load`` runs whatever callable a file names, so a crafted batch file executes code. ``safe_load`` only
resolves an allow-list of globals: plain container/number/string builtins and the functions numpy uses to
rebuild arrays, dtypes and scalars (and ``_codecs.encode``, which protocol-2 pickles use for bytes). Anything else (``os.system``, ``builtins.eval``, ``builtins.getattr``, ...)
raises ``pickle.UnpicklingError`` naming the refused global, before it is called.
"""
from __future__ import annotations

import io
import pickle
from typing import Any, BinaryIO

_BUILTINS = frozenset({"dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray", "str", "int", "float",
                       "complex", "bool", "slice"})
# (module, name) of numpy's array / dtype / scalar reconstruction, under numpy 1.x and 2.x module names
_NUMPY = frozenset({
    (m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")
} | {(m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")}
    | {("numpy", "ndarray"), ("numpy", "dtype")})


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the allow-listed globals (see the module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in _BUILTINS:   # __builtin__: Python 2 pickles
            import builtins
            return getattr(builtins, name)
        if (module, name) in _NUMPY:
            import importlib
            if module.startswith("numpy.core"):   # numpy 2 moved numpy.core to numpy._core
                try:
                    return getattr(importlib.import_module("numpy._core" + module[len("numpy.core"):]), name)
                except ImportError:
                    pass
            return getattr(importlib.import_module(module), name)
        if module == "numpy.dtypes" and name.endswith("DType"):   # numpy 2 may name a dtype's class
            import importlib
            return getattr(importlib.import_module(module), name)
        if (module, name) == ("_codecs", "encode"):   # protocol-2 pickles of bytes written by Python 3
            import _codecs
            return _codecs.encode
        raise pickle.UnpicklingError(f"refusing to load global '{module}.{name}' from a data file "
                                     "(only numpy arrays and plain builtins are allowed)")


def safe_load(fh: BinaryIO, encoding: str = "latin1") -> Any:
    """``pickle.load`` restricted to numpy arrays and plain builtins; ``encoding`` as in ``pickle.load``
    (latin1 reads Python 2 pickles such as the official CIFAR batches). A refusal names the file."""
    try:
        return SafeUnpickler(fh, encoding=encoding).load()
    except pickle.UnpicklingError as e:
        name = getattr(fh, "name", None)
        raise pickle.UnpicklingError(f"{name}: {e}" if isinstance(name, str) else str(e)) from None


def safe_loads(data: bytes, encoding: str = "latin1") -> Any:
    return safe_load(io.BytesIO(data), encoding)
