"""splitveil: measure and defend the privacy of split (edge-cloud) inference against model inversion.

The small Python API (see README, "Python API")::

    from splitveil import (DataConfig, build_data, ModelConfig, build_split_model, split, create_model,
                           build_defenses, create_defense, Edge, TrainConfig, Trainer, ATTACKS, create_attack,
                           run_attack, image_metrics, edge_cost, load_config, run_experiment, allow_plugins)

Names are imported on first use, so ``import splitveil`` (and ``splitveil --help``) does not load torch.
"""
from __future__ import annotations

import importlib
from typing import Any

from .version import __version__  # noqa: F401

_API = {
    "ATTACKS": ".attacks", "Attack": ".attacks", "run_attack": ".attacks",
    "DATASETS": ".data", "DataConfig": ".data", "build_data": ".data",
    "DEFENSES": ".defenses", "Defense": ".defenses", "Edge": ".defenses", "build_defenses": ".defenses",
    "RunConfig": ".experiments", "config_from_dict": ".experiments", "load_config": ".experiments",
    "run_experiment": ".experiments",
    "edge_cost": ".metrics", "image_metrics": ".metrics", "mean_intra_class_radius": ".metrics",
    "MODELS": ".models", "ModelConfig": ".models", "build_split_model": ".models", "create_model": ".models",
    "split": ".models",
    "ConfigError": ".params", "allow_plugins": ".registry",
    "create_attack": ".attacks", "create_defense": ".defenses",
    "TrainConfig": ".training", "Trainer": ".training",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    mod = _API.get(name)
    if mod is None:
        raise AttributeError(f"module 'splitveil' has no attribute '{name}'")
    value = getattr(importlib.import_module(mod, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
