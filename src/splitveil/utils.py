"""Small shared helpers: seeding, devices, progress bars, atomic files."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but CUDA is not available (use --device cpu or auto)")
    return dev


def progress(iterable: Iterable | None = None, enabled: bool = True, **kw: Any):
    """A tqdm progress bar on stderr (a silent pass-through when disabled or stderr is not a terminal)."""
    import sys

    from tqdm.auto import tqdm

    kw.setdefault("mininterval", 0.5)
    kw.setdefault("dynamic_ncols", True)
    # only on a terminal: redirected to a file or a pipe, a bar is a stream of '\r' lines (logs say more)
    interactive = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm(iterable, disable=not (enabled and interactive), **kw)


def _atomic_write(path: str | Path, write) -> None:
    """``write(fh)`` into ``.<name>.tmp<pid>``, fsync it, rename it over ``path``, fsync the folder: after a
    crash or power loss ``path`` is the old file or the complete new one, and no temporary file is left
    (except after a kill; :func:`remove_stale_tmp` clears those)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - folders that cannot be opened or synced (some file systems)
        pass


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """Write ``obj`` to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    _atomic_write(path, lambda fh: torch.save(obj, fh))


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic_write(path, lambda fh: fh.write(text.encode()))


def remove_stale_tmp(folder: str | Path) -> list[Path]:
    """Delete temporary files left by a killed writer (``.<name>.tmp<pid>``); call while holding the folder's lock."""
    gone = []
    for f in Path(folder).glob(".*.tmp*"):
        if f.is_file():
            f.unlink(missing_ok=True)
            gone.append(f)
    return gone


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
