"""Reward sources: where a reward comes from, and how far it went wrong."""

from alignkit.rewards.base import (
    CallStats,
    PairwiseJudge,
    Preference,
    RewardComparison,
    RewardError,
    RewardSource,
    Scores,
)
from alignkit.rewards.implicit import ImplicitReward
from alignkit.rewards.models import AGGREGATES, Ensemble, RewardModel, aggregate_scores
from alignkit.rewards.preference_model import PairScores, PreferenceEnsemble, PreferenceModelJudge
from alignkit.rewards.rules import RuleReward, load_rule
from alignkit.rewards.transforms import (
    RunningNorm,
    Transformed,
    clip,
    length_penalty,
    log_sigmoid_centered,
    par,
    reference_percentile,
)

__all__ = [
    "AGGREGATES",
    "CallStats",
    "Ensemble",
    "ImplicitReward",
    "PairScores",
    "PairwiseJudge",
    "Preference",
    "PreferenceEnsemble",
    "PreferenceModelJudge",
    "RewardComparison",
    "RewardError",
    "RewardModel",
    "RewardSource",
    "RuleReward",
    "RunningNorm",
    "Scores",
    "Transformed",
    "aggregate_scores",
    "clip",
    "length_penalty",
    "load_rule",
    "log_sigmoid_centered",
    "par",
    "reference_percentile",
]
