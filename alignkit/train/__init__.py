"""Training loops and run management."""

from alignkit.train.recipes import DataConfig, RunConfig, RunResult, config_from, train
from alignkit.train.trainer import NonFiniteError, TrainConfig, Trainer

__all__ = ["DataConfig", "NonFiniteError", "RunConfig", "RunResult", "TrainConfig", "Trainer",
           "config_from", "train"]
