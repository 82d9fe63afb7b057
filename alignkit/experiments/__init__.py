"""`alignkit experiment NAME`: the seed papers' claims at small scale, over seeds, with confidence intervals."""

from alignkit.experiments import overoptimization, r3m_noise, routing, self_improvement, self_rewarding  # noqa: F401  (registers)
from alignkit.experiments.base import EXPERIMENTS, run_experiment

__all__ = ["EXPERIMENTS", "run_experiment"]
