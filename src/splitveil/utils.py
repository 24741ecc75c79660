"""Small shared helpers: seeding, devices, progress bars, atomic files and the digests of saved state."""
from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import random
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from .params import CorruptFileError

log = logging.getLogger("splitveil.integrity")


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
    # only on a terminal: redirected to a file or a pipe, a bar is a stream of '\r' lines (logs say more)
    interactive = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    if interactive and "ncols" not in kw:
        cols, rows = terminal_size(sys.stderr)
        if cols:
            kw.setdefault("dynamic_ncols", True)     # follows resizes
        else:   # a pty that reports 0 columns (`script`, some CI runners): a fixed width, not an empty line
            kw["dynamic_ncols"] = False
            kw["ncols"] = _env_size("COLUMNS", 80)
        if not rows:   # tqdm hides every bar on a terminal of 0 lines
            kw.setdefault("nrows", _env_size("LINES", 24))
    return tqdm(iterable, disable=not (enabled and interactive), **kw)


def terminal_size(stream) -> tuple[int, int]:
    """(columns, lines) that ``stream``'s terminal reports; 0 for what it reports as 0 or when it is no terminal."""
    try:
        size = os.get_terminal_size(stream.fileno())
        return int(size.columns), int(size.lines)
    except (AttributeError, ValueError, OSError):
        return 0, 0


def _env_size(name: str, default: int) -> int:
    """``$COLUMNS`` / ``$LINES`` when a positive number, else ``default``."""
    try:
        v = int(os.environ.get(name, ""))
    except ValueError:
        v = 0
    return v if v > 0 else default


class DiskFullError(OSError):
    """A save ran out of space (ENOSPC / EDQUOT): the message names the file; what was saved before is intact."""


class IntegrityError(CorruptFileError):
    """A saved file does not match the SHA-256 recorded when it was written (or has none recorded)."""


_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _write_all(fh, data: bytes) -> None:
    """Write ``data`` to ``fh`` (one place, so that a full disk can be simulated in tests)."""
    fh.write(data)


def _atomic_write(path: str | Path, write, shown: Path | None = None) -> None:
    """``write(fh)`` into ``.<name>.tmp<pid>``, fsync it, rename it over ``path``, fsync the folder: after a
    crash or power loss ``path`` is the old file or the complete new one, and no temporary file is left
    (except after a kill; :func:`remove_stale_tmp` clears those). A full disk raises :class:`DiskFullError`
    naming ``path`` (or ``shown``, the file it stands for; the old file is kept)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, DiskFullError) and e.errno in _FULL:
            raise DiskFullError(e.errno, f"no space left on device while writing {shown or path} (the file as it was "
                                         f"before is kept); free some space and run the same command again") from e
        raise
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - folders that cannot be opened or synced (some file systems)
        pass


# -- saved state with a recorded digest ----------------------------------------------------------------------
DIGEST_SUFFIX = ".sha256"
PREVIOUS_SUFFIX = ".prev"


def digest_path(path: str | Path) -> Path:
    """``<file>.sha256``: the SHA-256 recorded when ``path`` was written (``sha256sum -c`` reads it)."""
    path = Path(path)
    return path.with_name(path.name + DIGEST_SUFFIX)


def previous_path(path: str | Path) -> Path:
    """``<stem>.prev<suffix>`` (``checkpoint.prev.pt``): the state saved before ``path``, kept by
    ``atomic_torch_save(..., keep_previous=True)``."""
    path = Path(path)
    return path.with_name(f"{path.stem}{PREVIOUS_SUFFIX}{path.suffix}")


def _record_digest(path: Path, digest: str) -> None:
    atomic_write_text(digest_path(path), f"{digest}  {path.name}\n")


def recorded_digest(path: str | Path) -> str | None:
    """The digest recorded for ``path`` (None when there is none, or it cannot be read)."""
    try:
        text = digest_path(path).read_text().split()
    except (OSError, UnicodeDecodeError):
        return None
    return text[0].lower() if text and len(text[0]) == 64 else None


def atomic_torch_save(obj: Any, path: str | Path, keep_previous: bool = False) -> str:
    """Save ``obj`` for a later resume: serialised in memory, written to a temporary file and renamed (a crash
    never leaves a half-written file), then its SHA-256 is recorded in ``<file>.sha256`` (written atomically,
    right after the file). :func:`load_verified` checks it before the state is used. ``keep_previous``: the
    file being replaced is kept as ``<stem>.prev<suffix>`` with its digest (the last state to fall back on).
    A full disk raises :class:`DiskFullError` naming the file; what was saved before stays as it was.
    Returns the digest."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    side = digest_path(path)
    if keep_previous and path.exists():
        # write the new file under a temporary name first: a full disk then leaves the current pair untouched
        staged = path.with_name(f".{path.name}.new{os.getpid()}")
        _atomic_write(staged, lambda fh: _write_all(fh, data), shown=path)
        prev = previous_path(path)
        digest_path(prev).unlink(missing_ok=True)    # never a stale digest beside the file it does not describe
        os.replace(path, prev)
        if side.exists():
            os.replace(side, digest_path(prev))
        os.replace(staged, path)
    else:
        side.unlink(missing_ok=True)   # a crash before the new digest is written leaves the file unverifiable
        _atomic_write(path, lambda fh: _write_all(fh, data))
    _record_digest(path, digest)
    return digest


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verified_bytes(path: Path) -> bytes:
    """The bytes of ``path`` if they match its recorded digest; :class:`IntegrityError` naming it otherwise."""
    want = recorded_digest(path)
    if want is None:
        raise IntegrityError(f"{path}: no SHA-256 recorded for it ({digest_path(path).name} is missing or "
                             f"unreadable), so it cannot be verified")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise IntegrityError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        raise IntegrityError(f"{path}: SHA-256 mismatch (recorded {want[:12]}..., file {got[:12]}...): the file was "
                             f"altered or damaged after it was written")
    return data


def verify_file(path: str | Path) -> str | None:
    """None when ``path`` matches its recorded digest, else why not (a missing file included)."""
    path = Path(path)
    if not path.is_file():
        return f"{path}: does not exist"
    try:
        _verified_bytes(path)
    except IntegrityError as e:
        return str(e)
    return None


def load_verified(path: str | Path, map_location: Any = None) -> Any:
    """``torch.load`` (``weights_only=True``) of state saved by :func:`atomic_torch_save`, after checking its
    recorded SHA-256 on the very bytes that are loaded; :class:`IntegrityError` naming the file when the digest
    is missing or differs, or the file cannot be read."""
    path = Path(path)
    data = _verified_bytes(path)
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:   # verified but unreadable: written by another version, or not a checkpoint
        raise IntegrityError(f"{path}: matches its digest but is not a readable checkpoint "
                             f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None


def load_or_none(path: str | Path | None, fallback: str, map_location: Any = None) -> Any:
    """:func:`load_verified` for resumed state that can be recomputed: None when ``path`` does not exist, and
    None after a warning naming the file and saying what happens instead (``fallback``) when it cannot be
    verified (it is then set aside as ``<file>.corrupt``, so that it is not read again)."""
    if path is None or not Path(path).exists():
        return None
    try:
        return load_verified(path, map_location)
    except IntegrityError as e:
        _set_aside(Path(path))
        log.warning("%s; %s", e, fallback)
        return None


def restore_verified(path: str | Path, what: str = "training") -> bool:
    """Before resuming from ``path`` (saved with ``keep_previous=True``): True when it, or the state saved
    before it, verifies. A file that does not verify is set aside as ``<file>.corrupt`` and a warning names
    it and says what happens instead: resuming from the previous state (moved back to ``path``) or a fresh
    start of ``what`` (False)."""
    path = Path(path)
    prev = previous_path(path)
    if not path.exists() and not prev.exists():
        return False
    bad = verify_file(path) if path.exists() else None
    if path.exists() and bad is None:
        return True
    if bad is not None:
        _set_aside(path)
    prev_bad = verify_file(prev) if prev.exists() else f"{prev}: does not exist"
    if prev_bad is None:
        os.replace(prev, path)
        os.replace(digest_path(prev), digest_path(path))
        log.warning("%s; resuming %s from the last verified state instead, %s (one save earlier)",
                    bad or f"{path}: missing", what, prev.name)
        return True
    if prev.exists():
        _set_aside(prev)
    log.warning("%s; no earlier verified state (%s): %s starts from scratch", bad or f"{path}: missing",
                prev_bad, what)
    return False


def _set_aside(path: Path) -> None:
    """Keep a file that failed its check for inspection (``<file>.corrupt``), out of the way of the resume."""
    os.replace(path, path.with_name(path.name + ".corrupt"))
    digest_path(path).unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic_write(path, lambda fh: _write_all(fh, text.encode()))


def remove_stale_tmp(folder: str | Path) -> list[Path]:
    """Delete temporary files left by a killed writer (``.<name>.tmp<pid>``, ``.<name>.new<pid>``); call while
    holding the folder's lock."""
    gone = []
    for f in [*Path(folder).glob(".*.tmp*"), *Path(folder).glob(".*.new*")]:
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
