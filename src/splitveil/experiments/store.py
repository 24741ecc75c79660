"""Moved to :mod:`splitveil.results.store` (the results layer, below experiments/ and report/); kept so that
old imports still work."""
from ..results.store import (SCHEMA, STATUSES, ResultsStore, RunBusyError, is_finished, lock_path, owner_id,  # noqa: F401
                             results_paths, run_lock)
