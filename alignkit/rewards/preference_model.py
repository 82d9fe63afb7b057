"""Pairwise judges built on trained preference models (alignkit pairwise-rm), and their ensembles.

Xu et al. 2025 (arXiv 2510.20369), section 2.3 of the algorithms reference: the model scores a
pair in both orders and is symmetrised, s = (g_hat(a, b) - g_hat(b, a)) / 2 and
u = (u(a, b) + u(b, a)) / 2, so that P(a > b) = sigma(s) = 1 - P(b > a) exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from alignkit.data.tokenize import TokenizeConfig
from alignkit.models.pairwise import PairEncoder, PreferenceModel, pair_predictions
from alignkit.rewards.base import CallStats, PairwiseJudge, Preference, Prompt


@dataclass
class PairScores:
    """Per pair: the calibrated logit and uncertainty of each order, and their symmetrised values.

    Uncertainties are None for a head that reports none (linear).
    """

    logit_ab: Tensor
    logit_ba: Tensor
    uncertainty_ab: Tensor | None
    uncertainty_ba: Tensor | None

    @property
    def logits(self) -> Tensor:
        """s = (g_hat(a, b) - g_hat(b, a)) / 2, antisymmetric in (a, b)."""
        return (self.logit_ab - self.logit_ba) / 2

    @property
    def uncertainty(self) -> Tensor | None:
        if self.uncertainty_ab is None:
            return None
        return (self.uncertainty_ab + self.uncertainty_ba) / 2


class PreferenceModelJudge:
    shardable = ("model",)
    """A trained PreferenceModel as a PairwiseJudge: P(a better than b) with its uncertainty.

    The uncertainty is the SNGP head's u >= 1 (1 = certain), the dropout head's standard
    deviation of the logits, or None for the linear head.
    """

    def __init__(self, model: PreferenceModel, tokenizer, *, batch_size: int = 16,
                 tokenize: TokenizeConfig | None = None):
        self.model, self.batch_size = model, batch_size
        self.encoder, self.pad_id = PairEncoder(tokenizer, tokenize), tokenizer.pad_token_id
        self.stats = CallStats()

    def compare(self, prompts: Sequence[Prompt], a: Sequence[str], b: Sequence[str]) -> Preference:
        scores = self.compare_detailed(prompts, a, b)
        return Preference(torch.sigmoid(scores.logits), scores.uncertainty)

    @torch.no_grad()
    def compare_detailed(self, prompts: Sequence[Prompt], a: Sequence[str], b: Sequence[str]) -> PairScores:
        """Both orders of every pair, unsymmetrised (for routers and diagnostics)."""
        encoded = [self.encoder.encode(p, x, y) for p, first, second in zip(prompts, a, b, strict=True)
                   for x, y in ((first, second), (second, first))]
        was_training = self.model.training
        self.model.eval()
        with self.stats.timed(len(prompts)):
            parts = [pair_predictions(self.model, encoded[start:start + self.batch_size], self.pad_id)
                     for start in range(0, len(encoded), self.batch_size)]
        self.model.train(was_training)
        logits = torch.cat([g.cpu() for g, _ in parts]) if parts else torch.zeros(0)
        uncertain = bool(parts) and parts[0][1] is not None
        u = torch.cat([u.cpu() for _, u in parts]) if uncertain else None
        return PairScores(logits[0::2], logits[1::2], _every_other(u, 0), _every_other(u, 1))


def _every_other(values: Tensor | None, start: int) -> Tensor | None:
    return None if values is None else values[start::2]


class PreferenceEnsemble:
    shardable = ("members",)
    """K pairwise judges (e.g. separately trained preference models): the mean of their logits,
    and the standard deviation of their logits as the uncertainty. A member's failure marks the
    pair failed (probability 0.5)."""

    def __init__(self, members: Sequence[PairwiseJudge]):
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two members")
        self.members, self.stats = list(members), CallStats()

    def compare(self, prompts: Sequence[Prompt], a: Sequence[str], b: Sequence[str]) -> Preference:
        with self.stats.timed(len(prompts)):
            results = [m.compare(prompts, a, b) for m in self.members]
        logits = torch.stack([r.logits for r in results])
        probs = torch.sigmoid(logits.mean(0))
        failures = [r.failed for r in results if r.failed is not None]
        failed = torch.stack(failures).any(0) if failures else None
        if failed is not None:
            probs = torch.where(failed, torch.full_like(probs, 0.5), probs)
        return Preference(probs, logits.std(0, unbiased=False), failed)
