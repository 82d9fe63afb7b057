"""Reward sources built on trained models: a reward model (one or K heads), and ensembles of sources."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from alignkit.data.tokenize import Encoder, TokenizeConfig
from alignkit.models.logprobs import reward_head_scores
from alignkit.registry import Registry
from alignkit.rewards.base import CallStats, Prompt, RewardSource, Scores

AGGREGATES = Registry("ensemble aggregate")


def aggregate_scores(rewards: Tensor, aggregate: str = "mean", k: float = 1.0, failed: Tensor | None = None) -> Scores:
    """K rewards per sample ([K, n]) -> the registered aggregate, with the K values' spread (std) as uncertainty."""
    values = AGGREGATES.call(aggregate, rewards, k=k)
    return Scores(values, uncertainty=rewards.std(0, unbiased=False), failed=failed)


class RewardModel:
    shardable = ("model",)   # models scored on every rank's equal share: FSDP2 may shard them (train/rl.py)
    """A sequence classifier (what `alignkit reward` trains) as a reward source.

    A one-output model gives its score. A model with K reward heads (`model.heads=K`) gives their
    aggregate (`aggregate`: mean, min or mean_minus_std with `k`, as Ensemble) and the heads'
    standard deviation as the uncertainty.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 16, tokenize: TokenizeConfig | None = None,
                 aggregate: str = "mean", k: float = 1.0):
        AGGREGATES.get(aggregate)
        self.model, self.batch_size, self.aggregate, self.k = model, batch_size, aggregate, k
        self.encoder, self.pad_id = Encoder(tokenizer, tokenize), tokenizer.pad_token_id
        self.stats = CallStats()

    @torch.no_grad()
    def score(self, prompts: Sequence[Prompt], completions: Sequence[str], references=None) -> Scores:
        encoded = [self.encoder.encode(p, c) for p, c in zip(prompts, completions, strict=True)]
        with self.stats.timed(len(encoded)):
            rewards = torch.cat([reward_head_scores(self.model, encoded[start:start + self.batch_size],
                                                    self.pad_id).cpu()
                                 for start in range(0, len(encoded), self.batch_size)])
        if rewards.shape[1] == 1:
            return Scores(rewards[:, 0])
        return aggregate_scores(rewards.T, self.aggregate, self.k)


@AGGREGATES.register("mean", summary="mean of the members", paper="Coste et al. 2023, arXiv 2310.02743")
def _mean(rewards: torch.Tensor, *, k: float = 1.0) -> torch.Tensor:
    return rewards.mean(0)


@AGGREGATES.register("min", summary="worst case (WCO)", paper="Coste et al. 2023, arXiv 2310.02743")
def _min(rewards: torch.Tensor, *, k: float = 1.0) -> torch.Tensor:
    return rewards.min(0).values


@AGGREGATES.register("mean_minus_std", summary="mean - k * std", paper="Eisenstein et al. 2023, arXiv 2312.09244")
def _mean_minus_std(rewards: torch.Tensor, *, k: float = 1.0) -> torch.Tensor:
    return rewards.mean(0) - k * rewards.std(0, unbiased=False)


class Ensemble:
    shardable = ("members",)
    """K reward sources scored together; the members' spread (std) is the uncertainty.

    A member's failure marks the sample failed; the aggregate still uses every member's value.
    """

    def __init__(self, members: Sequence[RewardSource], aggregate: str = "mean", k: float = 1.0):
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two members")
        AGGREGATES.get(aggregate)
        self.members, self.aggregate, self.k = list(members), aggregate, k
        self.stats = CallStats()

    def score(self, prompts, completions, references=None) -> Scores:
        with self.stats.timed(len(prompts)):
            results = [m.score(prompts, completions, references) for m in self.members]
        rewards = torch.stack([r.values for r in results])
        failures = [r.failed for r in results if r.failed is not None]
        failed = torch.stack(failures).any(0) if failures else None
        return aggregate_scores(rewards, self.aggregate, self.k, failed)
