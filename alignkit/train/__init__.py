"""Training: one loop (`loop.py`) into which offline objectives and online RL steps plug."""

from alignkit.train.loop import Loop, NonFiniteError, TrainConfig
from alignkit.train.recipes import DataConfig, RunConfig, RunResult, config_from, train

__all__ = ["DataConfig", "Loop", "NonFiniteError", "RunConfig", "RunResult", "TrainConfig", "config_from", "train"]
