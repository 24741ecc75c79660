"""Sweeps: one base config and a grid or list of overrides; every point is a normal run (its own folder and
results-store row, via ``run_experiment``). Finished points are skipped on a re-run, interrupted ones resume
from their checkpoints, so a sweep killed at any moment continues with nothing lost and nothing run twice.

The package, in the order a sweep goes through it:

- :mod:`.spec`: the sweep file (``SweepSpec``, coerced like a run config) -> ``Sweep`` of ``SweepPoint`` s;
- :mod:`.runner`: ``run_sweep`` (skip the finished, run the rest on a backend), ``check_points``, ``describe``;
- :mod:`.backends`: ``local`` (worker processes on this machine) and ``ray`` (a Ray cluster);
- :mod:`.point`: one point in a worker (``execute_point``: lock, skip or resume, run);
- :mod:`.locks`: which worker holds which point, and marking the points of dead workers interrupted;
- :mod:`.progress`: the live status line and the ``Tracker`` of results.

See docs/sweeps.md for the file format.
"""
from .backends import BACKENDS
from .point import execute_point
from .progress import SweepProgress, Tracker, _Tracker
from .runner import SweepResult, check_points, describe, run_sweep
from .spec import SWEEP_KEYS, Sweep, SweepPoint, SweepSpec, expand, load_sweep, parse_sweep, sweep_from_dict

__all__ = ["BACKENDS", "SWEEP_KEYS", "Sweep", "SweepPoint", "SweepProgress", "SweepResult", "SweepSpec", "Tracker",
           "check_points", "describe", "execute_point", "expand", "load_sweep", "parse_sweep", "run_sweep",
           "sweep_from_dict"]
