"""Generative judges: a causal LM, local or behind an HTTP endpoint, asked to judge in words.

`GenerativeJudge` is a PairwiseJudge: P(a better than b). `GenerativeScorer` is a RewardSource:
a score per completion. Both go through a Backend (`alignkit.judges.backends`) and share one
ask-parse-retry loop:

- A verdict is read with the template's parser. Where the backend returns top log-probs, the
  verdict is soft: P(A) = p(A) / (p(A) + p(B)) at the verdict token, and a score is the
  probability-weighted mean of the candidate scores there (single-digit scales, so each score is
  one token). Otherwise the verdict is hard: A -> 1, B -> 0, tie -> 0.5.
- An unparsable answer is counted, then handled by `on_unparsable`: "retry" asks again up to
  `retries` times at `retry_temperature` with a new seed and abstains if it never parses;
  "abstain" marks the item failed (probability 0.5 / the scale's midpoint, `failed` set);
  "tie" gives 0.5 / the midpoint without marking it failed.
- A backend error (after the backend's own retries) always marks the item failed.
- Position-swap debiasing (`swap=True`, pairwise): each pair is judged in both orders and
  P = (P(a, b) + 1 - P(b, a)) / 2; the uncertainty is the orders' disagreement
  |P(a, b) - (1 - P(b, a))|, and 1 where only one order gave a verdict.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

import torch

from alignkit.judges.templates import (
    Match,
    pairwise_messages,
    parse_score,
    parse_verdict,
    pointwise_messages,
)
from alignkit.rewards.base import CallStats, Preference, Prompt, Scores

ON_UNPARSABLE = ("retry", "abstain", "tie")
VERDICT_PROBABILITY = {"A": 1.0, "B": 0.0, "tie": 0.5}
Reader = Callable[[object], "float | None"]


def token_at(tokens: list[str], offset: int) -> int | None:
    """Index of the generated token covering character `offset` of their concatenation."""
    end = 0
    for index, token in enumerate(tokens):
        end += len(token)
        if offset < end:
            return index
    return None


def _candidate_logprobs(generation, match: Match, candidates: Sequence[str]) -> dict[str, float]:
    """Top log-probs of each candidate label at the token where the verdict was written."""
    tokens, top = getattr(generation, "tokens", None), getattr(generation, "top_logprobs", None)
    if not tokens or not top or "".join(tokens) != generation.text:
        return {}
    index = token_at(tokens, match.start)
    if index is None or index >= len(top):
        return {}
    found: dict[str, float] = {}
    for token, logprob in top[index].items():
        label = token.strip()
        for candidate in candidates:
            if label.lower() == candidate.lower() and candidate not in found:
                found[candidate] = logprob
    return found


def verdict_probability(generation, use_logprobs: bool = True) -> float | None:
    """P(A better than B) from one judge answer, or None when it holds no verdict."""
    match = parse_verdict(generation.text)
    if match is None:
        return None
    if use_logprobs and match.value != "tie":
        found = _candidate_logprobs(generation, match, ("A", "B"))
        if found:
            p_a, p_b = (math.exp(found.get(label, -math.inf)) for label in ("A", "B"))
            return p_a / (p_a + p_b)
    return VERDICT_PROBABILITY[match.value]


def score_value(generation, low: int, high: int, use_logprobs: bool = True) -> float | None:
    """A pointwise score from one judge answer, or None when it holds none in [low, high]."""
    match = parse_score(generation.text, low, high)
    if match is None:
        return None
    if use_logprobs and high < 10:
        found = _candidate_logprobs(generation, match, [str(k) for k in range(int(low), int(high) + 1)])
        if found:
            weights = {int(k): math.exp(lp) for k, lp in found.items()}
            return sum(k * w for k, w in weights.items()) / sum(weights.values())
    return float(match.value)


class _Asker:
    """Send conversations to a backend, read each answer, retry or fall back per the policy."""

    def __init__(self, backend, *, max_tokens: int, temperature: float, on_unparsable: str, retries: int,
                 retry_temperature: float, use_logprobs: bool, top_logprobs: int):
        if on_unparsable not in ON_UNPARSABLE:
            raise ValueError(f"on_unparsable must be one of {ON_UNPARSABLE}, got {on_unparsable!r}")
        self.backend, self.max_tokens, self.temperature = backend, max_tokens, temperature
        self.on_unparsable, self.retries, self.retry_temperature = on_unparsable, retries, retry_temperature
        self.use_logprobs, self.top_logprobs = use_logprobs, top_logprobs
        self.stats, self.outcomes = CallStats(), Counter()

    def _generate(self, conversations: list, temperature: float, seed: int | None) -> list:
        top = self.top_logprobs if self.use_logprobs else 0
        return self.backend.generate(conversations, max_tokens=self.max_tokens, temperature=temperature,
                                     top_logprobs=top, seed=seed)

    def ask(self, conversations: list, read: Reader, fallback: float) -> tuple[list[float], list[bool]]:
        """One value per conversation, and whether it failed."""
        values: list[float | None] = [None] * len(conversations)
        errors = [False] * len(conversations)
        pending, temperature = list(range(len(conversations))), self.temperature
        attempts = 1 + (self.retries if self.on_unparsable == "retry" else 0)
        for attempt in range(attempts):
            answers = self._generate([conversations[i] for i in pending], temperature, seed=attempt or None)
            for i, answer in zip(pending, answers, strict=True):
                errors[i] = answer.error is not None
                values[i] = None if errors[i] else read(answer)
            pending = [i for i in pending if values[i] is None and not errors[i]]
            self.outcomes["unparsable"] += len(pending)
            if not pending or attempt == attempts - 1:
                break
            self.outcomes["retried"] += len(pending)
            temperature = self.retry_temperature
        self.outcomes["errors"] += sum(errors)
        tie_ok = self.on_unparsable == "tie"
        failed = [v is None and (e or not tie_ok) for v, e in zip(values, errors, strict=True)]
        return [fallback if v is None else v for v in values], failed

    def metrics(self, prefix: str) -> dict[str, float]:
        """The judge's counts (tokens are the backend's), its outcomes, and the backend's accounting."""
        rows = {k: v for k, v in self.stats.metrics(prefix).items() if not k.endswith("_tokens")}
        rows |= {f"{prefix}/{k}": v for k, v in sorted(self.outcomes.items())}
        return rows | self.backend.stats.metrics(f"{prefix}/backend")


class GenerativeJudge(_Asker):
    """A PairwiseJudge that asks a language model which of two answers is better."""

    def __init__(self, backend, *, template: str = "pairwise", max_tokens: int = 512, temperature: float = 0.0,
                 swap: bool = True, on_unparsable: str = "retry", retries: int = 2, retry_temperature: float = 0.7,
                 use_logprobs: bool = True, top_logprobs: int = 5):
        super().__init__(backend, max_tokens=max_tokens, temperature=temperature, on_unparsable=on_unparsable,
                         retries=retries, retry_temperature=retry_temperature, use_logprobs=use_logprobs,
                         top_logprobs=top_logprobs)
        self.template, self.swap = template, swap

    def _one_order(self, prompts, a, b) -> tuple[torch.Tensor, torch.Tensor]:
        conversations = [pairwise_messages(self.template, p, x, y) for p, x, y in zip(prompts, a, b, strict=True)]
        probs, failed = self.ask(conversations, lambda g: verdict_probability(g, self.use_logprobs), 0.5)
        return torch.tensor(probs, dtype=torch.float32), torch.tensor(failed)

    def compare(self, prompts: Sequence[Prompt], a: Sequence[str], b: Sequence[str]) -> Preference:
        with self.stats.timed(len(prompts)):
            forward, forward_failed = self._one_order(prompts, a, b)
            if not self.swap:
                preference = Preference(forward, None, forward_failed)
            else:
                backward, backward_failed = self._one_order(prompts, b, a)
                preference = _debiased(forward, forward_failed, 1 - backward, backward_failed)
        for message in (f"pair {i}: no verdict" for i in preference.failed.nonzero().flatten().tolist()):
            self.stats.failure(message)
        return preference


def _debiased(p_ab: torch.Tensor, failed_ab: torch.Tensor, p_ab_swapped: torch.Tensor,
              failed_swapped: torch.Tensor) -> Preference:
    both = ~failed_ab & ~failed_swapped
    probs = torch.where(both, (p_ab + p_ab_swapped) / 2, torch.where(failed_ab, p_ab_swapped, p_ab))
    failed = failed_ab & failed_swapped
    probs = torch.where(failed, torch.full_like(probs, 0.5), probs)
    uncertainty = torch.where(both, (p_ab - p_ab_swapped).abs(), torch.ones_like(probs))
    return Preference(probs, uncertainty, failed)


class GenerativeScorer(_Asker):
    """A RewardSource that asks a language model to rate each answer from `low` to `high`."""

    def __init__(self, backend, *, template: str = "pointwise", low: int = 1, high: int = 9, max_tokens: int = 512,
                 temperature: float = 0.0, on_unparsable: str = "retry", retries: int = 2,
                 retry_temperature: float = 0.7, use_logprobs: bool = True, top_logprobs: int = 10):
        super().__init__(backend, max_tokens=max_tokens, temperature=temperature, on_unparsable=on_unparsable,
                         retries=retries, retry_temperature=retry_temperature, use_logprobs=use_logprobs,
                         top_logprobs=top_logprobs)
        self.template, self.low, self.high = template, low, high

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str], references=None) -> Scores:
        conversations = [pointwise_messages(self.template, p, c, self.low, self.high)
                         for p, c in zip(prompts, completions, strict=True)]
        with self.stats.timed(len(conversations)):
            values, failed = self.ask(conversations, lambda g: score_value(g, self.low, self.high, self.use_logprobs),
                                      (self.low + self.high) / 2)
        for message in (f"sample {i}: no score" for i, f in enumerate(failed) if f):
            self.stats.failure(message)
        return Scores(torch.tensor(values, dtype=torch.float32), failed=torch.tensor(failed))
