"""Reward sources: where a reward comes from, and how far it went wrong."""

from alignkit.rewards.base import CallStats, RewardError, RewardSource, Scores
from alignkit.rewards.implicit import ImplicitReward
from alignkit.rewards.rules import RuleReward, load_rule

__all__ = ["CallStats", "ImplicitReward", "RewardError", "RewardSource", "RuleReward", "Scores", "load_rule"]
