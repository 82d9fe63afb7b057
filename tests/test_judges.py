"""Generative judges: verdict parsing, unparsable policies, position-swap debiasing, verdict probabilities.

The judge logic is tested here against a scripted backend (answers chosen per conversation) so each
policy has a known expected result; the same judges run against real models and a real HTTP server
in test_judges_live.py.
"""

import math

import pytest
import torch

from alignkit.judges.backends import Generation
from alignkit.judges.generative import GenerativeJudge, GenerativeScorer, token_at, verdict_probability
from alignkit.judges.templates import TEMPLATES, answer_text, pairwise_messages, parse_score, parse_verdict
from alignkit.rewards.base import CallStats


class ScriptedBackend:
    """Answers each conversation with script(user_text, attempt); counts requests."""

    def __init__(self, script):
        self.script, self.stats, self.requests, self.attempt = script, CallStats(), [], 0

    def generate(self, conversations, *, max_tokens=256, temperature=0.0, top_logprobs=0, seed=None):
        self.requests.append((len(conversations), temperature, seed))
        answers = [self.script(c[-1]["content"], seed or 0) for c in conversations]
        return [a if isinstance(a, Generation) else Generation(a) for a in answers]


def first_answer(user_text: str) -> str:
    return user_text.split("[Answer A]\n")[1].split("\n")[0]


@pytest.mark.parametrize("text, verdict", [
    ("<answer>A</answer>", "A"),
    ("<think>B looks wrong</think>\n<answer> b </answer>", "B"),
    ("I compared them. [[A]]", "A"),
    ("Verdict: tie", "tie"),
    ("<answer>A</answer> on reflection <answer>B</answer>", "B"),   # the last verdict counts
    ("The better answer is: B", "B"),
])
def test_parse_verdict_reads_the_last_verdict(text, verdict):
    assert parse_verdict(text).value == verdict


@pytest.mark.parametrize("text", ["", "no idea", "<answer>C</answer>", "<answer></answer>", "AB"])
def test_parse_verdict_gives_none_without_a_verdict(text):
    assert parse_verdict(text) is None


def test_parse_score_checks_the_range():
    assert parse_score("<think>ok</think><answer>7</answer>", 1, 9).value == "7"
    assert parse_score("Score: 3", 1, 9).value == "3"
    assert parse_score("<answer>12</answer>", 1, 9) is None
    assert parse_score("nothing", 1, 9) is None


def test_answer_text_round_trips_through_the_parser():
    assert parse_verdict(answer_text("B", "A has 2 wrong letters")).value == "B"
    assert parse_score(answer_text("4"), 1, 9).value == "4"


def test_templates_fill_every_field_and_check_their_kind():
    messages = pairwise_messages("pairwise", [{"role": "user", "content": "2+2?"}], "4", "5")
    assert "user: 2+2?" in messages[-1]["content"] and "[Answer B]\n5" in messages[-1]["content"]
    assert {e.name for e in TEMPLATES} >= {"pairwise", "pointwise"}
    with pytest.raises(ValueError, match="pointwise, not pairwise"):
        pairwise_messages("pointwise", "q", "a", "b")


def test_token_at_maps_character_offsets_to_tokens():
    tokens = ["<answer>", "B", "</answer>"]
    assert token_at(tokens, 0) == 0 and token_at(tokens, 8) == 1 and token_at(tokens, 9) == 2
    assert token_at(tokens, 100) is None


def test_verdict_probability_uses_the_verdict_tokens_logprobs():
    tokens = ["<answer>", "A", "</answer>"]
    top = [{"<answer>": 0.0}, {"A": math.log(0.6), " B": math.log(0.2), "C": math.log(0.2)}, {"</answer>": 0.0}]
    soft = Generation("<answer>A</answer>", tokens=tokens, top_logprobs=top)
    assert verdict_probability(soft) == pytest.approx(0.75)      # 0.6 / (0.6 + 0.2)
    assert verdict_probability(soft, use_logprobs=False) == 1.0
    only_a = Generation("<answer>A</answer>", tokens=tokens, top_logprobs=[{}, {"A": -0.1}, {}])
    assert verdict_probability(only_a) == 1.0                    # B outside the top-k: p(B) = 0
    mismatched = Generation("<answer>A</answer>", tokens=["x"], top_logprobs=[{"A": -1.0}])
    assert verdict_probability(mismatched) == 1.0                # tokens do not spell the text: hard verdict


def test_scorer_takes_the_expected_score_over_digit_tokens():
    tokens = ["<answer>", "7", "</answer>"]
    top = [{}, {"7": math.log(0.5), "3": math.log(0.5)}, {}]
    backend = ScriptedBackend(lambda text, attempt: Generation("<answer>7</answer>", tokens=tokens, top_logprobs=top))
    scores = GenerativeScorer(backend).score(["q"], ["a"])
    assert scores.values.tolist() == [5.0] and scores.failed.tolist() == [False]


def test_swap_debiasing_cancels_a_position_bias():
    """A judge that always says A is perfectly position-biased: after swapping it knows nothing."""
    judge = GenerativeJudge(ScriptedBackend(lambda text, attempt: "<answer>A</answer>"))
    preference = judge.compare(["q", "q"], ["x", "y"], ["y", "x"])
    assert preference.probs.tolist() == [0.5, 0.5]
    assert preference.uncertainty.tolist() == [1.0, 1.0]         # the two orders disagree completely
    assert preference.failed.tolist() == [False, False]


def test_swap_keeps_a_consistent_verdict_and_reports_no_disagreement():
    prefers_good = ScriptedBackend(lambda text, attempt: "<answer>A</answer>" if first_answer(text) == "good"
                                   else "<answer>B</answer>")
    preference = GenerativeJudge(prefers_good).compare(["q", "q"], ["good", "bad"], ["bad", "good"])
    assert preference.probs.tolist() == [1.0, 0.0]
    assert preference.uncertainty.tolist() == [0.0, 0.0]
    assert len(prefers_good.requests) == 2                       # one batched request per order


def test_retry_policy_asks_again_with_a_new_seed_and_temperature():
    backend = ScriptedBackend(lambda text, attempt: "<answer>A</answer>" if attempt == 2 else "hmm")
    judge = GenerativeJudge(backend, swap=False, on_unparsable="retry", retries=2, retry_temperature=0.7)
    preference = judge.compare(["q"], ["x"], ["y"])
    assert preference.probs.tolist() == [1.0] and preference.failed.tolist() == [False]
    assert backend.requests == [(1, 0.0, None), (1, 0.7, 1), (1, 0.7, 2)]
    assert judge.outcomes["unparsable"] == 2 and judge.outcomes["retried"] == 2


def test_retry_policy_abstains_when_retries_run_out():
    judge = GenerativeJudge(ScriptedBackend(lambda text, attempt: "no idea"), swap=False, retries=1)
    preference = judge.compare(["q", "q"], ["x", "z"], ["y", "w"])
    assert preference.probs.tolist() == [0.5, 0.5] and preference.failed.tolist() == [True, True]
    assert judge.stats.failures == 2 and judge.stats.examples[0] == "pair 0: no verdict"


@pytest.mark.parametrize("policy, failed", [("abstain", True), ("tie", False)])
def test_abstain_and_tie_policies(policy, failed):
    backend = ScriptedBackend(lambda text, attempt: "garbled" if first_answer(text) == "x" else "<answer>B</answer>")
    judge = GenerativeJudge(backend, swap=False, on_unparsable=policy)
    preference = judge.compare(["q", "q"], ["x", "z"], ["y", "w"])
    assert preference.probs.tolist() == [0.5, 0.0]
    assert preference.failed.tolist() == [failed, False]
    assert len(backend.requests) == 1                            # no retries under these policies
    assert judge.metrics("judge")["judge/unparsable"] == 1


def test_backend_errors_fail_the_item_but_keep_the_rest():
    def script(text, attempt):
        return Generation("", error="HTTP 500") if first_answer(text) == "x" else "<answer>A</answer>"

    judge = GenerativeJudge(ScriptedBackend(script), swap=False, on_unparsable="tie")
    preference = judge.compare(["q", "q"], ["x", "z"], ["y", "w"])
    assert preference.failed.tolist() == [True, False] and preference.probs.tolist() == [0.5, 1.0]
    assert judge.outcomes["errors"] == 1


def test_swap_falls_back_to_the_order_that_answered():
    def script(text, attempt):
        return "<answer>B</answer>" if first_answer(text) == "y" else "garbled"   # only the swapped order parses

    preference = GenerativeJudge(ScriptedBackend(script), on_unparsable="abstain").compare(["q"], ["x"], ["y"])
    assert preference.probs.tolist() == [1.0]                    # "B" about (y, x) means x is better
    assert preference.uncertainty.tolist() == [1.0] and preference.failed.tolist() == [False]


def test_scorer_policies_and_midpoint():
    backend = ScriptedBackend(lambda text, attempt: "Score: 8" if "good" in text else "???")
    scores = GenerativeScorer(backend, on_unparsable="abstain").score(["q", "q"], ["good", "bad"])
    assert scores.values.tolist() == [8.0, 5.0] and scores.failed.tolist() == [False, True]


def test_judge_rejects_an_unknown_policy():
    with pytest.raises(ValueError, match="on_unparsable"):
        GenerativeJudge(ScriptedBackend(lambda t, a: ""), on_unparsable="guess")


def test_preference_probabilities_are_tensors_of_the_batch_size():
    judge = GenerativeJudge(ScriptedBackend(lambda text, attempt: "<answer>tie</answer>"))
    preference = judge.compare(["q"] * 3, ["a"] * 3, ["b"] * 3)
    assert isinstance(preference.probs, torch.Tensor) and preference.probs.tolist() == [0.5] * 3
