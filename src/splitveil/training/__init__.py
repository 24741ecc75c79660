"""The one training loop, checkpoints and resume."""
from .trainer import NonFiniteLossError, TrainConfig, Trainer

__all__ = ["NonFiniteLossError", "TrainConfig", "Trainer"]
