"""Child processes that stop with their parent (issue 22): a sweep killed with ``kill -9`` leaves no worker behind.

:func:`run_child` is the target of a spawned worker process. It arms the parent-death stop *before* importing the
worker's module (importing torch takes seconds, tens of seconds on a loaded machine: a parent that dies meanwhile
must not leave the child to start work), then calls the worker. This module imports nothing heavy.

- Linux: ``prctl(PR_SET_PDEATHSIG, SIGTERM)``: the kernel sends SIGTERM the moment the parent dies. Before the
  worker installs its own handler SIGTERM simply ends the process; after, it interrupts the running point (marked
  interrupted in the store).
- everywhere (and as a second line on Linux): a daemon thread that sees the parent pid change sends SIGTERM to
  this process, and if it is still alive ``KILL_AFTER_S`` later ends it with ``os._exit`` (its point then stays
  'running' until the next sweep marks it interrupted).
"""
from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import time
from typing import Any

PARENT_POLL_S = 1.0
KILL_AFTER_S = 10.0


def _pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):   # no libc prctl: the watchdog alone
        return False


def die_with_parent(parent: int) -> None:
    """Stop this process within seconds of the death of process ``parent`` (its parent when called)."""
    _pdeathsig(signal.SIGTERM)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(KILL_AFTER_S)
        os._exit(143)

    threading.Thread(target=watch, name="splitveil-lifeline", daemon=True).start()
    if os.getppid() != parent:   # the parent died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)


def run_child(parent: int, module: str, name: str, args: tuple[Any, ...]) -> Any:
    """Process target: :func:`die_with_parent`, then ``module.name(*args)``."""
    die_with_parent(parent)
    return getattr(importlib.import_module(module), name)(*args)
