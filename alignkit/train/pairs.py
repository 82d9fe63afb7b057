"""Rules that turn one prompt's judged samples into comparisons to train on.

A rule sees a `JudgedGroup`: the prompt's G sampled answers (token ids), their scores and win
matrix when the run has a reward source or judge, the reference answer when the record has one, and
a seeded random generator. It returns `Comparison`s: a chosen answer, a rejected one (None for the
rules that keep single answers) and target probabilities the loss may read.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
from torch import Tensor

from alignkit.registry import Registry

PAIR_RULES = Registry("comparison rule")


@dataclass
class Comparison:
    """One training item of a comparison set; log-probs are filled in when the round's set is built."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int] | None = None
    chosen_target: float = 1.0
    rejected_target: float = 0.0
    gap: float = 0.0                       # score of chosen minus score of rejected (0 when unknown)
    logps: dict = field(default_factory=dict)  # {"anchor"|"reference": [chosen, rejected]}


@dataclass
class JudgedGroup:
    prompt: list[int]
    answers: list[list[int]]               # G sampled answers
    scores: Tensor | None = None           # [G] reward, or win rate when judged in pairs
    wins: Tensor | None = None             # [G, G] P(answer i beats answer j)
    reference: list[int] | None = None     # the record's reference answer, tokenised
    reference_score: float | None = None
    alternatives: list[list[int]] = field(default_factory=list)   # Nash-MD: one mixture sample per answer
    alternative_wins: Tensor | None = None                          # [G] P(answer i beats its alternative)
    consistency: float = 1.0               # CREAM: agreement of this ranking with the previous iterate's

    def drop(self, lost: Tensor) -> None:
        """Leave out the answers whose score failed: a failure score is no evidence to rank by."""
        keep = (~lost).nonzero().flatten()
        self.answers = [self.answers[i] for i in keep.tolist()]
        self.scores, self.wins = self.scores[keep], self.wins[keep][:, keep]


def win_matrix(scores: Tensor) -> Tensor:
    """Bradley-Terry P(i beats j) = sigmoid(s_i - s_j) from scalar scores."""
    return torch.sigmoid(scores[:, None] - scores[None, :])


def _scores(group: JudgedGroup, rule: str) -> Tensor:
    if group.scores is None:
        raise ValueError(f"comparison rule {rule!r} ranks answers: the run needs a reward source or a judge")
    return group.scores


def _pair(group: JudgedGroup, best: int, worst: int, scores: Tensor, **targets) -> Comparison:
    return Comparison(group.prompt, group.answers[best], group.answers[worst],
                      gap=float(scores[best] - scores[worst]), **targets)


@PAIR_RULES.register("best-worst", summary="the highest- against the lowest-scored answer; ties dropped",
                     kind="pair", needs="scores")
def best_worst(group: JudgedGroup, rng: random.Random, *, min_margin: float = 0.0,
               include_reference: bool = False) -> list[Comparison]:
    """With include_reference, the reference answer competes as one more candidate (DNO-Prct's gold answer)."""
    scores, answers = _scores(group, "best-worst"), list(group.answers)
    if include_reference and group.reference is not None:
        scores = torch.cat([scores, scores.new_tensor([group.reference_score])])
        answers.append(group.reference)
    best, worst = int(scores.argmax()), int(scores.argmin())
    if scores[best] - scores[worst] <= min_margin:
        return []
    return [Comparison(group.prompt, answers[best], answers[worst], gap=float(scores[best] - scores[worst]))]


@PAIR_RULES.register("all-pairs", summary="every pair whose scores differ by more than min_margin",
                     kind="pair", needs="scores")
def all_pairs(group: JudgedGroup, rng: random.Random, *, min_margin: float = 0.0) -> list[Comparison]:
    scores = _scores(group, "all-pairs")
    g = len(group.answers)
    return [_pair(group, i, j, scores) if scores[i] > scores[j] else _pair(group, j, i, scores)
            for i in range(g) for j in range(i + 1, g) if abs(float(scores[i] - scores[j])) > min_margin]


@PAIR_RULES.register("soft-pairs", summary="best against worst with target P(best beats worst) from the win matrix "
                     "(DNO's soft labels)", kind="pair", needs="scores")
def soft_pairs(group: JudgedGroup, rng: random.Random, *, min_margin: float = 0.0) -> list[Comparison]:
    scores = _scores(group, "soft-pairs")
    best, worst = int(scores.argmax()), int(scores.argmin())
    if scores[best] - scores[worst] <= min_margin:
        return []
    p = float(group.wins[best, worst])
    return [_pair(group, best, worst, scores, chosen_target=p, rejected_target=1 - p)]


@PAIR_RULES.register("win-rate", summary="best against worst, each with its win rate against the group (SPPO)",
                     kind="pair", needs="scores")
def win_rate(group: JudgedGroup, rng: random.Random, *, hard: bool = False) -> list[Comparison]:
    """P(y beats pi_t) ~ (1/G) sum_j P(y beats y_j) (j = y itself counts 1/2); `hard`: targets 1 and 0."""
    scores = _scores(group, "win-rate")
    rates = group.wins.mean(1)
    best, worst = int(scores.argmax()), int(scores.argmin())
    if best == worst or scores[best] == scores[worst]:
        return []
    targets = (1.0, 0.0) if hard else (float(rates[best]), float(rates[worst]))
    return [_pair(group, best, worst, scores, chosen_target=targets[0], rejected_target=targets[1])]


@PAIR_RULES.register("reference-vs-sample", summary="the record's reference answer against each sample (SPIN)",
                     kind="pair", needs="reference")
def reference_vs_sample(group: JudgedGroup, rng: random.Random) -> list[Comparison]:
    if group.reference is None:
        raise ValueError("comparison rule 'reference-vs-sample' needs prompt records with a reference answer")
    return [Comparison(group.prompt, group.reference, answer) for answer in group.answers
            if answer != group.reference]


@PAIR_RULES.register("best", summary="the highest-scored answer alone, if at least min_score and not tied with "
                     "every other (RAFT's best-of-N)", kind="single", needs="scores")
def best(group: JudgedGroup, rng: random.Random, *, min_score: float = -math.inf) -> list[Comparison]:
    """A group whose answers all score the same says nothing about which to keep: it is dropped."""
    scores = _scores(group, "best")
    top = int(scores.argmax())
    if float(scores[top]) < min_score or bool((scores == scores[top]).all()):
        return []
    return [Comparison(group.prompt, group.answers[top])]


@PAIR_RULES.register("threshold", summary="every answer scored at least `threshold` (ReST's improve step)",
                     kind="single", needs="scores")
def threshold(group: JudgedGroup, rng: random.Random, *, threshold: float = 0.5) -> list[Comparison]:
    scores = _scores(group, "threshold")
    return [Comparison(group.prompt, answer) for answer, score in zip(group.answers, scores.tolist(), strict=True)
            if score >= threshold]


@PAIR_RULES.register("rso", summary="statistical rejection sampling towards pi_ref exp(r / beta), then the accepted "
                     "answers ranked into a pair", kind="pair", needs="scores")
def rso(group: JudgedGroup, rng: random.Random, *, beta: float = 0.5, accept: int = 2) -> list[Comparison]:
    """RSO (Liu et al. 2023, arXiv 2309.06657, Algorithm 1): candidates from the sampling policy are
    visited in random order and accepted with probability exp((r - r_max) / beta), without replacement,
    until `accept` are taken; the accepted ones are ranked by reward (their rso-sample-rank pairs)."""
    scores = _scores(group, "rso")
    ceiling, taken = float(scores.max()), []
    order = list(range(len(scores)))
    while order and len(taken) < accept:
        i = order.pop(rng.randrange(len(order)))
        if rng.random() < math.exp((float(scores[i]) - ceiling) / beta):
            taken.append(i)
    if len(taken) < 2:
        return []
    taken.sort(key=lambda i: -float(scores[i]))
    best_i, worst_i = taken[0], taken[-1]
    return [] if scores[best_i] == scores[worst_i] else [_pair(group, best_i, worst_i, scores)]


@PAIR_RULES.register("against-alternative", summary="each policy sample with P(it beats a sample of the "
                     "alternative policy) as its target (Nash-MD)", kind="single", needs="alternatives")
def against_alternative(group: JudgedGroup, rng: random.Random) -> list[Comparison]:
    if group.alternative_wins is None:
        raise ValueError("comparison rule 'against-alternative' needs comparisons.sampler=mixture")
    return [Comparison(group.prompt, answer, chosen_target=float(p))
            for answer, p in zip(group.answers, group.alternative_wins.tolist(), strict=True)]
