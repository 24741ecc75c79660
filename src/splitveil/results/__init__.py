"""The results layer: typed records of what runs measured, the results store, and the image grids runs save.

It sits below ``experiments/`` (which writes records) and ``report/`` (which reads them), and imports neither:
see ``docs/architecture.md`` (layers) and :mod:`splitveil.results.records` (the record types)."""
from .records import (GPZ_ATTACK_KEYS, IMAGE_METRICS, METRIC_DIRECTIONS, AttackResult, EdgeCost, GPZRow, ImageScores,
                      RunRecord, WorstCase, WorstMetric, flag_text, weak_attack_warnings, worst_case)
from .store import ResultsStore, RunBusyError, is_finished, open_store, results_paths, run_lock

__all__ = ["AttackResult", "EdgeCost", "GPZRow", "GPZ_ATTACK_KEYS", "IMAGE_METRICS", "ImageScores", "METRIC_DIRECTIONS",
           "ResultsStore", "RunBusyError", "RunRecord", "WorstCase", "WorstMetric", "flag_text", "is_finished",
           "open_store", "results_paths", "run_lock", "weak_attack_warnings", "worst_case"]
