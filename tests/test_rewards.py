"""Reward sources: implicit log-ratio rewards and rule rewards with their failure policies."""

import time

import pytest
import torch

from alignkit.data import Encoder
from alignkit.data.tokenize import collate
from alignkit.models import naive_token_logprobs, tiny_model, tiny_tokenizer
from alignkit.rewards import ImplicitReward, RewardError, RuleReward, load_rule

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
