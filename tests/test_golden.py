"""Golden numbers that run on every CPU (issue 22): the six defense-family runs of test_contract, the legacy
fixture's run and its GPZ sweep, trained in float32 (``precision: auto`` resolved as on a CPU without fast bf16)
and compared with ``tests/data/golden/fp32.json`` within a tolerance derived from the measured run-to-run spread
(see tests/golden.py and tests/data/golden/measure.py). The bf16 comparisons with the numbers of the code before
the refactors stay in test_contract / test_results and run where they were recorded (AMX-BF16)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from golden import CASES, HERE, KIND_ENV, cpu_kind, goldens_for, load_goldens, mismatches

MEASURE = HERE / "data" / "golden" / "measure.py"


def fresh_process(case: str) -> dict:
    """The case's numbers from a fresh interpreter, exactly as measure.py recorded them (a run earlier in the same
    process can leave state that moves the last bits: tests/data/legacy_run/make_fixture.py), whatever ran before
    in this test session or which tests ``-k`` selected."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    for k in KIND_ENV:   # the kernels of this CPU kind, as recorded
        env.pop(k, None)
    out = subprocess.run([sys.executable, str(MEASURE), "--one", case], env=env, capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert out.returncode == 0 and lines, f"{case} failed to run (exit {out.returncode}):\n{out.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("case", list(CASES))
def test_golden_numbers_in_float32(case, tmp_path, request):
    kind = cpu_kind()
    goldens = goldens_for(kind)
    if goldens is None:
        pytest.skip(f"no float32 goldens for CPU kind {kind!r} (recorded: {', '.join(load_goldens()['kinds'])}); "
                    f"record them here with: OMP_NUM_THREADS=1 PYTHONPATH=src python tests/data/golden/measure.py "
                    f"&& python tests/data/golden/measure.py --write")
    if case.startswith("legacy"):
        request.getfixturevalue("data_root")   # MNIST (the families use the bundled digits)
    got = fresh_process(case)
    bad = mismatches(case, got, goldens)
    assert not bad, (f"{case}: {len(bad)} value(s) differ from the goldens of CPU kind {kind} in "
                     f"tests/data/golden/fp32.json (relative tolerance {goldens['rtol']:.3g}):\n" + "\n".join(bad))


def test_the_goldens_record_their_tolerance_and_the_measured_spread():
    g = load_goldens()
    repeat = max(g["spread"]["repeat"].values())
    for kind in g["kinds"].values():
        assert set(kind["cases"]) == set(CASES) and kind["rtol"] == max(g["min_rtol"], g["spread_factor"] * repeat)
    # across kernel choices the spread is far above any useful tolerance: why goldens are per CPU kind
    assert max(v for var, per in g["spread"].items() if var != "repeat" for v in per.values()) > 100 * g["min_rtol"]
