"""Measures the run-to-run spread of the golden cases (tests/golden.py) in float32 and writes ``fp32.json``.

Every case runs in a fresh process per variant: the default kernels (whose numbers become the goldens), the
same again (run-to-run on one machine), and other kernel choices this machine can make, standing in for other
CPU kinds: oneDNN limited to AVX2 with ATen's vector code at AVX2, and oneDNN limited to SSE4.1 with ATen's
vector code off. The spread of a case under a variant is the largest relative difference of any of its numbers
from the default variant. The repeat's spread (0 measured: bitwise identical) sets the tolerance within a CPU kind,
``SPREAD_FACTOR`` x it, at least ``MIN_RTOL``; the other variants' (up to 0.11 relative: discrete decisions flip)
are why the goldens are recorded per CPU kind (tests/golden.py ``cpu_kind``).

    OMP_NUM_THREADS=1 PYTHONPATH=src python tests/data/golden/measure.py [--jobs 2] [--cases family:none,...]
    python tests/data/golden/measure.py --write      # fp32.json from the raw measurements (raw.json)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parents[1]
RAW = HERE / "raw.json"
VARIANTS = {
    "default": {},
    "repeat": {},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
    "sse41-novec": {"ONEDNN_MAX_CPU_ISA": "SSE41", "ATEN_CPU_CAPABILITY": "default"},
}
REPEAT_CASES = ("family:none", "legacy_gpz")   # the unchanged repeat: these two only (time)


def one(case: str) -> None:
    sys.path.insert(0, str(TESTS))
    from golden import CASES, fp32_everywhere

    with tempfile.TemporaryDirectory() as tmp, fp32_everywhere():
        got = CASES[case](Path(tmp))
    print("RESULT " + json.dumps(got))


def measure(cases: list[str], jobs: int, variants: tuple[str, ...] = ()) -> None:
    raw = json.loads(RAW.read_text()) if RAW.exists() else {}
    todo = [(c, v) for v in VARIANTS for c in cases
            if (v != "repeat" or c in REPEAT_CASES) and v not in raw.get(c, {}) and (v in variants or not variants)]
    running: list[tuple[str, str, subprocess.Popen, float]] = []
    while todo or running:
        while todo and len(running) < jobs:
            c, v = todo.pop(0)
            env = {**os.environ, **VARIANTS[v], "OMP_NUM_THREADS": "1"}
            p = subprocess.Popen([sys.executable, __file__, "--one", c], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True)
            running.append((c, v, p, time.time()))
        time.sleep(1)
        for item in list(running):
            c, v, p, t0 = item
            if p.poll() is None:
                continue
            running.remove(item)
            lines = [ln for ln in p.stdout.read().splitlines() if ln.startswith("RESULT ")]
            if p.returncode != 0 or not lines:
                print(f"{c} {v}: failed (exit {p.returncode})", flush=True)
                continue
            raw = json.loads(RAW.read_text()) if RAW.exists() else {}
            raw.setdefault(c, {})[v] = json.loads(lines[-1][7:])
            RAW.write_text(json.dumps(raw, indent=1))
            print(f"{c} {v}: {time.time() - t0:.0f} s", flush=True)


def write() -> None:
    """fp32.json: this CPU kind's goldens (the default variant) with rtol = max(MIN_RTOL, SPREAD_FACTOR x the
    run-to-run spread), and the measured spread of every variant (why the goldens are per kind)."""
    sys.path.insert(0, str(TESTS))
    from golden import GOLDEN_FILE, MIN_RTOL, SPREAD_FACTOR, cpu_kind

    raw = json.loads(RAW.read_text())
    spread: dict[str, dict[str, float]] = {}
    for case, by_variant in raw.items():
        gold = by_variant["default"]
        for v, got in by_variant.items():
            if v == "default":
                continue
            worst = 0.0
            for k, w in gold.items():
                if k.startswith("="):
                    worst = worst if got[k] == w else float("inf")
                    continue
                worst = max(worst, abs(got[k] - w) / abs(w) if w else abs(got[k]))
            spread.setdefault(v, {})[case] = worst
    repeat = max(spread.get("repeat", {}).values(), default=0.0)
    old = json.loads(GOLDEN_FILE.read_text()) if GOLDEN_FILE.exists() else {"kinds": {}}
    kinds = dict(old.get("kinds", {}))
    kinds[cpu_kind()] = {"recorded": time.strftime("%Y-%m-%d"), "rtol": max(MIN_RTOL, SPREAD_FACTOR * repeat),
                         "cases": {c: v["default"] for c, v in raw.items()}}
    out = {"about": "float32 goldens of tests/golden.py per CPU kind; made by tests/data/golden/measure.py (see its "
                    "docstring); spread: the largest relative difference from the default variant of any number of "
                    "each case under each variant, measured on the kind named in spread_kind",
           "variants": dict(VARIANTS), "spread_kind": cpu_kind(), "spread": spread, "spread_factor": SPREAD_FACTOR,
           "min_rtol": MIN_RTOL, "kinds": kinds}
    GOLDEN_FILE.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({"kind": cpu_kind(), "spread": spread, "rtol": kinds[cpu_kind()]["rtol"]}, indent=1))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--one")
    ap.add_argument("--cases")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--variants", default="")
    a = ap.parse_args()
    if a.one:
        one(a.one)
    elif a.write:
        write()
    else:
        sys.path.insert(0, str(TESTS))
        from golden import CASES

        measure(a.cases.split(",") if a.cases else list(CASES), a.jobs,
                tuple(v for v in a.variants.split(",") if v))
