"""Process-level settings that make CPU runs faster without changing any result.

:func:`tune_allocator`: PyTorch's CPU kernels allocate and free multi-megabyte buffers at every step. glibc serves
blocks above its mmap threshold (128 KB at start, adapting up to 32 MB) with fresh ``mmap`` pages and gives
them back on ``free``, so every step faults in thousands of zeroed pages again. Measured on the project's
2-core AMD EPYC (Zen 5) VM, one bf16 training step of the paper-regime CIFAR-10 model at batch 128, one
thread: 4,000-11,000 minor page faults per step before, 100-400 after, and 5-10% less CPU time per step
(benchmarks/results/run_cost.md). The settings only change where freed memory waits for its next use
(the process keeps up to ~1 GB of it); numbers are bit-for-bit the same. ``SPLITVEIL_MALLOC_TUNE=0`` turns it off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from typing import Any

log = logging.getLogger("splitveil")

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20     # glibc's maximum on 64-bit: blocks below it come from the heap and are reused
TRIM_THRESHOLD = 1 << 30      # free heap memory is returned to the system only above 1 GB
TOP_PAD = 64 << 20            # grow the heap in 64 MB steps

_state: dict[str, Any] | None = None


def tune_allocator() -> dict[str, Any]:
    """Apply the allocator settings once per process (glibc on Linux only); returns what was done, for
    metrics.json (``{"allocator": "glibc", "mmap_threshold": ..., ...}`` or ``{"allocator": ..., "tuned": False,
    "reason": ...}``)."""
    global _state
    if _state is not None:
        return dict(_state)
    if os.environ.get("SPLITVEIL_MALLOC_TUNE", "1") == "0":
        _state = {"allocator": "system", "tuned": False, "reason": "SPLITVEIL_MALLOC_TUNE=0"}
    elif not sys.platform.startswith("linux"):
        _state = {"allocator": "system", "tuned": False, "reason": f"not glibc ({sys.platform})"}
    else:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError) as e:   # musl and others have no mallopt
            _state = {"allocator": "system", "tuned": False, "reason": f"no mallopt ({e})"}
        else:
            ok = all(mallopt(k, v) == 1 for k, v in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                                     (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD)))
            _state = ({"allocator": "glibc", "tuned": True, "mmap_threshold": MMAP_THRESHOLD,
                       "trim_threshold": TRIM_THRESHOLD, "top_pad": TOP_PAD} if ok
                      else {"allocator": "glibc", "tuned": False, "reason": "mallopt refused a setting"})
            if not ok:
                log.warning("allocator: glibc refused a mallopt setting; CPU steps may fault more pages")
    return dict(_state)
