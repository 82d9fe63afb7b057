"""Reward sources: implicit log-ratio rewards and rule rewards with their failure policies."""

import math
import time

import pytest
import torch

from alignkit.data import Encoder
from alignkit.data.tokenize import collate
from alignkit.models import naive_token_logprobs, tiny_model, tiny_tokenizer
from alignkit.rewards import (
    Ensemble,
    ImplicitReward,
    RewardError,
    RewardModel,
    RuleReward,
    RunningNorm,
    Transformed,
    clip,
    length_penalty,
    load_rule,
    log_sigmoid_centered,
    par,
    reference_percentile,
)

PROMPTS, COMPLETIONS = ["abc=", "hello", "x="], ["def", "w", "yz!"]


def _by_hand(model, tok, normalize: bool) -> torch.Tensor:
    encoded = [Encoder(tok).encode(p, c) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    batch = collate(encoded, tok.pad_token_id)
    with torch.no_grad():
        lp = naive_token_logprobs(model, batch.input_ids, batch.attention_mask, batch.score_mask).sum(1)
    return lp / batch.lengths if normalize else lp


@pytest.mark.parametrize("normalize", [False, True])
def test_implicit_reward_is_beta_times_the_log_ratio(normalize):
    tok = tiny_tokenizer(128)
    target, baseline = tiny_model(seed=1), tiny_model(seed=2)
    source = ImplicitReward(target, baseline, tok, beta=0.5, length_normalize=normalize, batch_size=2)
    got = source.score(PROMPTS, COMPLETIONS).values
    want = 0.5 * (_by_hand(target, tok, normalize) - _by_hand(baseline, tok, normalize))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert source.stats.calls == 1 and source.stats.items == 3
    same = ImplicitReward(target, target, tok).score(PROMPTS, COMPLETIONS).values
    assert torch.equal(same, torch.zeros(3))


def exact(prompt, completion, reference):
    return float(completion == reference)


def test_rule_reward_scores_each_sample():
    scores = RuleReward(exact).score(["a", "b"], ["x", "y"], ["x", "z"])
    assert scores.values.tolist() == [1.0, 0.0] and not scores.failed.any()


def test_rule_reward_failures_are_counted_and_scored_by_policy():
    def flaky(prompt, completion, reference):
        if completion == "boom":
            raise ValueError("cannot parse")
        if completion == "nan":
            return float("nan")
        if completion == "text":
            return "1.0"
        return 1.0

    source = RuleReward(flaky, failure_score=-1.0)
    scores = source.score(["p"] * 4, ["ok", "boom", "nan", "text"])
    assert scores.values.tolist() == [1.0, -1.0, -1.0, -1.0]
    assert scores.failed.tolist() == [False, True, True, True]
    assert source.stats.failures == 3 and source.stats.timeouts == 0
    assert "sample 1: ValueError: cannot parse" in source.stats.examples[0]
    with pytest.raises(RewardError, match="sample 1: ValueError: cannot parse"):
        RuleReward(flaky, on_error="raise").score(["p"] * 2, ["ok", "boom"])


def test_a_hanging_rule_times_out_without_hanging_the_run():
    def slow(prompt, completion, reference):
        time.sleep(30 if completion == "hang" else 0)
        return 2.0

    source = RuleReward(slow, timeout_s=0.3)
    started = time.monotonic()
    scores = source.score(["p", "p", "p"], ["a", "hang", "b"])
    assert time.monotonic() - started < 5
    assert scores.values.tolist() == [2.0, 0.0, 2.0] and scores.failed.tolist() == [False, True, False]
    assert source.stats.timeouts == 1 and "timed out" in source.stats.examples[0]
    assert source.stats.metrics("reward")["reward/timeouts"] == 1


def test_load_rule_from_a_file(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text("def length(prompt, completion, reference):\n    return len(completion)\n")
    assert RuleReward(f"{path}:length").score(["p"], ["abcd"]).values.tolist() == [4.0]
    with pytest.raises(ValueError, match="no function 'missing'"):
        load_rule(f"{path}:missing")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_rule(f"{tmp_path}/nope.py:f")
    with pytest.raises(ValueError, match="path/to/file.py:function_name"):
        load_rule("no_colon")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('bad import')\n")
    with pytest.raises(ValueError, match="RuntimeError: bad import"):
        load_rule(f"{broken}:f")
    with pytest.raises(ValueError, match="on_error"):
        RuleReward(exact, on_error="ignore")


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_par_and_log_sigmoid_centering_match_their_closed_forms():
    r = torch.tensor([0.5, -1.0], dtype=torch.float64)
    ref = torch.tensor([[0.0, 1.0, 2.0], [-1.0, -3.0, 0.5]], dtype=torch.float64)
    want_par = [(_sig(0.5) + _sig(-0.5) + _sig(-1.5)) / 3, (_sig(0.0) + _sig(2.0) + _sig(-1.5)) / 3]
    assert par(r, ref).tolist() == pytest.approx(want_par, rel=1e-12)
    center = reference_percentile(ref, 0.5)
    assert center.tolist() == [1.0, -1.0]
    want_lsc = [math.log(_sig(0.5 - 1.0)), math.log(_sig(0.0))]
    assert log_sigmoid_centered(r, center).tolist() == pytest.approx(want_lsc, rel=1e-12)


def test_running_norm_uses_every_reward_seen_and_checkpoints():
    norm = RunningNorm()
    norm(torch.tensor([1.0, 3.0]))
    out = norm(torch.tensor([5.0, 7.0]))
    mean, std = 4.0, math.sqrt(((1 - 4) ** 2 + (3 - 4) ** 2 + (5 - 4) ** 2 + (7 - 4) ** 2) / 4)
    assert out.tolist() == pytest.approx([(5 - mean) / std, (7 - mean) / std], rel=1e-6)
    copy = RunningNorm()
    copy.load_state_dict(norm.state_dict())
    assert copy(torch.tensor([4.0])).tolist() == pytest.approx(norm(torch.tensor([4.0])).tolist())


def test_transforms_compose_on_any_source_and_keep_failures():
    def rule(prompt, completion, reference):
        if completion == "bad":
            raise ValueError("no")
        return float(len(completion))

    source = Transformed(RuleReward(rule, failure_score=-5.0), length_penalty(0.5), clip(-3.0, 2.0))
    scores = source.score(["p"] * 3, ["ab", "abcdef", "bad"])
    assert scores.values.tolist() == [1.0, 2.0, -3.0]
    assert scores.failed.tolist() == [False, False, True] and source.stats.failures == 1


def _constant(values):
    """A source that gives `values` to the samples in order."""
    by_completion = dict(zip("ab", values, strict=False))
    return RuleReward(lambda prompt, completion, reference: by_completion[completion])


def test_ensemble_aggregates_and_reports_the_spread_as_uncertainty():
    members = lambda: [_constant([1.0, 0.0]), _constant([3.0, 0.0]), _constant([5.0, 3.0])]  # noqa: E731
    mean = Ensemble(members(), "mean").score(["p", "q"], ["a", "b"])
    assert mean.values.tolist() == [3.0, 1.0]
    spread = [math.sqrt(8 / 3), math.sqrt(2.0)]
    assert mean.uncertainty.tolist() == pytest.approx(spread, rel=1e-6)
    assert Ensemble(members(), "min").score(["p", "q"], ["a", "b"]).values.tolist() == [1.0, 0.0]
    cautious = Ensemble(members(), "mean_minus_std", k=0.5).score(["p", "q"], ["a", "b"]).values
    assert cautious.tolist() == pytest.approx([3 - 0.5 * spread[0], 1 - 0.5 * spread[1]], rel=1e-6)
    with pytest.raises(ValueError, match="at least two"):
        Ensemble([_constant([1.0])])
    with pytest.raises(KeyError, match="unknown ensemble aggregate"):
        Ensemble(members(), "median")


def test_reward_model_source_scores_like_the_trained_classifier():
    from alignkit.models import tiny_reward_model
    from alignkit.models.logprobs import reward_scores as rewards

    tok = tiny_tokenizer(128)
    model = tiny_reward_model(tiny_model(seed=3))
    source = RewardModel(model, tok, batch_size=2)
    got = source.score(PROMPTS, COMPLETIONS).values
    encoded = [Encoder(tok).encode(p, c) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    with torch.no_grad():
        torch.testing.assert_close(got, rewards(model, encoded, tok.pad_token_id))
    assert source.stats.items == 3
