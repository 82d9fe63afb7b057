"""Uncertainty routing: a fast pairwise judge that defers its least certain pairs to a strong one.

Xu et al. 2025 (arXiv 2510.20369), section 2.3 of the algorithms reference. The fast judge (a
pairwise preference model with SNGP uncertainty, or any PairwiseJudge that reports uncertainty)
scores every pair; a routing rule picks pairs for the strong judge (an LLM judge), whose verdict
replaces the fast one. Rules, by name:

- "threshold": route pairs whose uncertainty exceeds `threshold` (the paper's u-bar, default 1.4);
- "top_q": route the ceil(q * n) most uncertain pairs of each batch, a call budget;
- "least_confident": route the ceil(q * n) pairs whose probability is nearest 1/2: a confidence
  baseline that needs no uncertainty estimate;
- "random": route ceil(q * n) pairs chosen uniformly: the baseline at the same budget.

With `strong_logit` set (default 2.0, as in the paper), the strong judge's decision becomes a
logit of +strong_logit (a better), -strong_logit (b better) or 0 (tie); with None its
probability is kept. A pair the strong judge fails on keeps the fast judge's answer; a pair the
fast judge fails on is always routed (on top of the rule's choice).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from alignkit.registry import Registry
from alignkit.rewards.base import CallStats, PairwiseJudge, Preference, Prompt

ROUTING = Registry("routing rule")


@ROUTING.register("threshold", summary="route pairs whose uncertainty exceeds the threshold",
                  paper="Xu et al. 2025, arXiv 2510.20369")
def route_threshold(fast: Preference, generator: torch.Generator, *, threshold: float = 1.4) -> Tensor:
    return _uncertainty(fast) > threshold


@ROUTING.register("top_q", summary="route the q most uncertain share of each batch (a call budget)",
                  paper="Xu et al. 2025, arXiv 2510.20369")
def route_top_q(fast: Preference, generator: torch.Generator, *, q: float = 0.2) -> Tensor:
    return _top(_uncertainty(fast), q)


@ROUTING.register("least_confident", summary="route the q share of each batch whose P(a > b) is nearest 1/2",
                  paper="a confidence baseline for uncertainty routing")
def route_least_confident(fast: Preference, generator: torch.Generator, *, q: float = 0.2) -> Tensor:
    return _top(-(fast.probs - 0.5).abs(), q)


@ROUTING.register("random", summary="route a uniformly random q share of each batch (baseline)",
                  paper="Xu et al. 2025, arXiv 2510.20369")
def route_random(fast: Preference, generator: torch.Generator, *, q: float = 0.2) -> Tensor:
    return _top(torch.rand(len(fast.probs), generator=generator), q)


def _uncertainty(fast: Preference) -> Tensor:
    if fast.uncertainty is None:
        raise ValueError("the fast judge reports no uncertainty; this routing rule needs one per pair")
    return fast.uncertainty


def _top(priority: Tensor, q: float) -> Tensor:
    """A mask of the ceil(q * n) entries of highest priority (ties broken by position)."""
    chosen = torch.zeros(len(priority), dtype=torch.bool)
    chosen[priority.argsort(descending=True, stable=True)[:_budget(q, len(priority))]] = True
    return chosen


def _budget(q: float, n: int) -> int:
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"routing budget q must lie in [0, 1], got {q}")
    return math.ceil(q * n)


class UncertaintyRouter:
    """A PairwiseJudge: the fast judge everywhere, the strong judge where the rule routes."""

    shardable = ("fast",)   # the strong judge sees a data-dependent subset: never sharded

    def __init__(self, fast: PairwiseJudge, strong: PairwiseJudge, *, rule: str = "threshold",
                 strong_logit: float | None = 2.0, seed: int = 0, **rule_options):
        ROUTING.call(rule, Preference(torch.zeros(0), torch.zeros(0)), torch.Generator(), **rule_options)
        self.fast, self.strong, self.rule, self.rule_options = fast, strong, rule, rule_options
        self.strong_logit, self.generator = strong_logit, torch.Generator().manual_seed(seed)
        self.stats, self.pairs, self.routed, self.strong_failed, self.agreed = CallStats(), 0, 0, 0, 0

    def compare(self, prompts: Sequence[Prompt], a: Sequence[str], b: Sequence[str]) -> Preference:
        with self.stats.timed(len(prompts)):
            fast = self.fast.compare(prompts, a, b)
            failed = fast.failure_mask().clone()
            routed = ROUTING.call(self.rule, fast, self.generator, **self.rule_options) | failed
            probs = fast.probs.clone()
            ids = routed.nonzero().flatten().tolist()
            self.routed += len(ids)
            if ids:
                strong = self.strong.compare([prompts[i] for i in ids], [a[i] for i in ids], [b[i] for i in ids])
                self._merge(probs, failed, ids, strong, fast.probs)
        self.pairs += len(prompts)
        return Preference(probs, fast.uncertainty, failed)

    def _merge(self, probs: Tensor, failed: Tensor, ids: list[int], strong: Preference, fast_probs: Tensor) -> None:
        answered = ~strong.failure_mask()
        strong_probs = strong.probs if self.strong_logit is None else torch.sigmoid(
            torch.sign(strong.probs - 0.5) * self.strong_logit)
        for k, i in enumerate(ids):
            if not answered[k]:
                self.strong_failed += 1
                continue
            self.agreed += int((strong.probs[k] > 0.5) == (fast_probs[i] > 0.5))
            probs[i], failed[i] = strong_probs[k], False

    def state_dict(self) -> dict:
        """The routing RNG and counters, for checkpoints."""
        return {"generator": self.generator.get_state(), "counts": (self.pairs, self.routed, self.strong_failed,
                                                                     self.agreed)}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.pairs, self.routed, self.strong_failed, self.agreed = state["counts"]

    def metrics(self, prefix: str = "router") -> dict[str, float]:
        answered = self.routed - self.strong_failed
        rows = {f"{prefix}/pairs": self.pairs, f"{prefix}/judge_calls": self.routed,
                f"{prefix}/judge_call_fraction": self.routed / max(self.pairs, 1),
                f"{prefix}/judge_failures": self.strong_failed,
                f"{prefix}/agreement_on_routed": self.agreed / answered if answered else float("nan")}
        return rows | self.stats.metrics(prefix)
