"""Uncertainty routing: which pairs go to the strong judge, what replaces the fast answer, metrics."""

import math

import pytest
import torch

from alignkit.rewards import CallStats, Ensemble, Preference, RewardComparison, RuleReward
from alignkit.rewards.routing import ROUTING, UncertaintyRouter


class TableJudge:
    """Answers pair i (identified by its text in `a`) from fixed tables."""

    def __init__(self, probs, uncertainty=None, failed=()):
        self.probs, self.uncertainty, self.failed = probs, uncertainty, set(failed)
        self.stats, self.seen = CallStats(), []

    def compare(self, prompts, a, b):
        ids = [int(x) for x in a]
        self.seen.append(ids)
        u = None if self.uncertainty is None else torch.tensor([self.uncertainty[i] for i in ids])
        return Preference(torch.tensor([self.probs[i] for i in ids]), u,
                          torch.tensor([i in self.failed for i in ids]))


def pairs(n):
    return ["q"] * n, [str(i) for i in range(n)], ["other"] * n


def test_threshold_routes_the_uncertain_pairs_and_uses_the_strong_logit():
    fast = TableJudge([0.9, 0.4, 0.6, 0.2], uncertainty=[1.0, 1.5, 1.41, 1.2])
    strong = TableJudge([0.0, 1.0, 0.0, 1.0])
    router = UncertaintyRouter(fast, strong, rule="threshold", threshold=1.4)
    preference = router.compare(*pairs(4))
    assert strong.seen == [[1, 2]]
    expected = [0.9, 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2)), 0.2]
    assert preference.probs.tolist() == pytest.approx(expected)
    assert preference.uncertainty.tolist() == pytest.approx([1.0, 1.5, 1.41, 1.2])
    metrics = router.metrics()
    assert metrics["router/judge_call_fraction"] == 0.5
    assert metrics["router/agreement_on_routed"] == 0.0      # the strong judge overruled both


def test_strong_probabilities_are_kept_without_a_strong_logit():
    fast = TableJudge([0.5, 0.5], uncertainty=[2.0, 0.0])
    strong = TableJudge([0.7, 0.1])
    preference = UncertaintyRouter(fast, strong, strong_logit=None, threshold=1.0).compare(*pairs(2))
    assert preference.probs.tolist() == pytest.approx([0.7, 0.5])


def test_top_q_routes_the_most_uncertain_share():
    fast = TableJudge([0.5] * 5, uncertainty=[0.1, 0.9, 0.3, 0.8, 0.2])
    strong = TableJudge([1.0] * 5)
    router = UncertaintyRouter(fast, strong, rule="top_q", q=0.4)
    router.compare(*pairs(5))
    assert sorted(strong.seen[0]) == [1, 3]


def test_least_confident_routes_the_probabilities_nearest_a_half_and_needs_no_uncertainty():
    strong = TableJudge([1.0] * 5)
    router = UncertaintyRouter(TableJudge([0.9, 0.45, 0.1, 0.6, 0.52]), strong, rule="least_confident", q=0.4)
    router.compare(*pairs(5))
    assert sorted(strong.seen[0]) == [1, 4]


def test_random_routing_spends_the_same_budget_reproducibly():
    def routed(seed):
        strong = TableJudge([1.0] * 10)
        UncertaintyRouter(TableJudge([0.5] * 10, uncertainty=list(range(10))), strong, rule="random",
                          q=0.3, seed=seed).compare(*pairs(10))
        return sorted(strong.seen[0])

    assert len(routed(0)) == 3 and routed(0) == routed(0)
    assert any(routed(seed) != routed(0) for seed in range(1, 5))


def test_a_strong_failure_keeps_the_fast_answer_and_a_fast_failure_is_routed():
    fast = TableJudge([0.8, 0.3, 0.5], uncertainty=[5.0, 0.0, 0.0], failed=[2])
    strong = TableJudge([0.0, 0.0, 1.0], failed=[0])
    router = UncertaintyRouter(fast, strong, threshold=1.0)
    preference = router.compare(*pairs(3))
    assert strong.seen == [[0, 2]]
    assert preference.probs.tolist() == pytest.approx([0.8, 0.3, 1 / (1 + math.exp(-2))])
    assert preference.failed.tolist() == [False, False, False]
    assert router.metrics()["router/judge_failures"] == 1


def test_routing_needs_an_uncertainty():
    router = UncertaintyRouter(TableJudge([0.5]), TableJudge([1.0]))
    with pytest.raises(ValueError, match="no uncertainty"):
        router.compare(*pairs(1))


def test_routing_options_are_checked_when_the_router_is_built():
    with pytest.raises(TypeError, match="takes no option"):
        UncertaintyRouter(TableJudge([0.5]), TableJudge([1.0]), rule="threshold", q=0.2)
    with pytest.raises(ValueError, match="budget"):
        ROUTING.call("top_q", Preference(torch.ones(3), torch.ones(3)), torch.Generator(), q=1.5)


def test_an_ensemble_of_reward_sources_routes_by_its_disagreement():
    """Real sources end to end: two rules that disagree on one pair send exactly that pair onward."""
    length = RuleReward(lambda prompt, completion, reference: float(len(completion)))
    vowels = RuleReward(lambda prompt, completion, reference: float(sum(c in "aeiou" for c in completion)))
    fast = RewardComparison(Ensemble([length, vowels]))
    strong = RewardComparison(RuleReward(lambda prompt, completion, reference: float(completion == "right")))
    router = UncertaintyRouter(fast, strong, threshold=1.0)
    preference = router.compare(["q", "q"], ["aaaa", "right"], ["aa", "bcdfgaa"])
    # pair 0: the members give each answer the same score (spread 0); pair 1: they differ -> routed.
    assert router.metrics()["router/judge_calls"] == 1
    assert preference.probs[1].item() == pytest.approx(1 / (1 + math.exp(-2)))
