"""Configs, runs and the results store."""
from .config import EvalConfig, RunConfig, config_from_dict, load_config
from .run import run_experiment
from .store import ResultsStore

__all__ = ["EvalConfig", "RunConfig", "ResultsStore", "config_from_dict", "load_config", "run_experiment"]
