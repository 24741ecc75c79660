"""splitveil: measure and defend the privacy of split (edge-cloud) inference against model inversion.

The small Python API (see README, "Python API")::

    from splitveil import (DataConfig, build_data, ModelConfig, build_split_model, split, create_model,
                           build_defenses, Edge, TrainConfig, Trainer, ATTACKS, run_attack,
                           image_metrics, edge_cost, load_config, run_experiment)
"""
__version__ = "0.1.0"

from .attacks import ATTACKS, Attack, run_attack  # noqa: E402
from .data import DATASETS, DataConfig, build_data  # noqa: E402
from .defenses import DEFENSES, Defense, Edge, build_defenses  # noqa: E402
from .experiments import RunConfig, config_from_dict, load_config, run_experiment  # noqa: E402
from .metrics import edge_cost, image_metrics, mean_intra_class_radius  # noqa: E402
from .models import MODELS, ModelConfig, build_split_model, create_model, split  # noqa: E402
from .params import ConfigError  # noqa: E402
from .training import TrainConfig, Trainer  # noqa: E402

__all__ = ["ATTACKS", "Attack", "ConfigError", "DATASETS", "DEFENSES", "DataConfig", "Defense", "Edge", "MODELS",
           "ModelConfig", "RunConfig", "TrainConfig", "Trainer", "build_data", "build_defenses", "build_split_model",
           "config_from_dict", "create_model", "edge_cost", "image_metrics", "load_config",
           "mean_intra_class_radius", "run_attack", "run_experiment", "split"]
