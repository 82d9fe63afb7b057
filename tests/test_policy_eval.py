"""Policy evaluation by a gold reward: win rate, KL to a reference on the policy's own samples, and the data knobs."""

import copy

import pytest
import torch

from alignkit.config import build
from alignkit.data.tokenize import Encoded
from alignkit.evaluation.policy import compare_policies, evaluate_policy, kl_to_reference, sample_policy, win_rate
from alignkit.models import tiny_model_and_tokenizer
from alignkit.models.logprobs import completion_logprobs
from alignkit.rollout.base import SamplingConfig
from alignkit.tasks import LanguageTask
from alignkit.train.recipes import DataConfig, load_splits

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPTS = ["ab:", "cd:", "efg:", "h:"] * 3


def test_win_rate_counts_ties_as_half():
    assert win_rate([1.0, 0.5, 0.0, 0.2], [0.0, 0.5, 1.0, 0.1]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)


def test_kl_to_reference_is_the_mean_summed_log_ratio_on_the_policy_samples():
    model, tokenizer = tiny_model_and_tokenizer(seed=1)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.lm_head.weight.mul_(1.5)
    samples = sample_policy(model, tokenizer, PROMPTS, lambda p, c: float(len(c)), SamplingConfig(max_new_tokens=6))
    encoded = [Encoded(c.prompt_ids, c.token_ids) for c in samples.completions]
    with torch.no_grad():
        ours = completion_logprobs(model, encoded, tokenizer.pad_token_id)[0]
        theirs = completion_logprobs(reference, encoded, tokenizer.pad_token_id)[0]
    expected = float((ours - theirs).mean())
    measured = kl_to_reference(samples, reference, tokenizer.pad_token_id, batch_size=5)
    assert measured == pytest.approx(expected, abs=1e-4)
    assert kl_to_reference(samples, model, tokenizer.pad_token_id) == pytest.approx(0.0, abs=1e-4)
    assert expected != pytest.approx(0.0, abs=1e-2)


def test_evaluate_policy_scores_samples_and_greedy_and_wins_against_a_baseline():
    model, tokenizer = tiny_model_and_tokenizer(seed=2)
    gold = lambda prompt, completion: float(len(completion) % 2)  # noqa: E731
    own, samples = evaluate_policy(model, tokenizer, PROMPTS, gold, reference=model, max_new_tokens=5)
    assert own["gold_reward"] == pytest.approx(sum(samples.gold) / len(PROMPTS))
    assert samples.gold == [gold(p, c.text) for p, c in zip(PROMPTS, samples.completions, strict=True)]
    again, _ = evaluate_policy(model, tokenizer, PROMPTS, gold, reference=model, baseline=samples, max_new_tokens=5)
    assert again["win_rate"] == 0.5 and again["gold_reward"] == own["gold_reward"]  # same seed, same samples
    assert set(own) == {"gold_reward", "greedy_gold_reward", "kl_to_reference", "response_length"}


def test_task_corpus_replaces_demonstrations_for_pretraining_a_base():
    cfg = build(DataConfig, {"task": "language", "task_corpus": True, "task_size": 20, "eval_size": 5})
    train, _, _ = load_splits(cfg, "demonstration")
    assert train == LanguageTask().corpus(20, 0)
    demos, ood, _ = load_splits(build(DataConfig, {"task": "language", "task_size": 20, "eval_size": 30,
                                                   "eval_split": "ood"}), "demonstration")
    task = LanguageTask()
    assert train != demos and all(d.prompt[:-1].split()[-1] in task.ood_words for d in ood)


def test_compare_policies_scores_each_policy_against_the_baseline_sampled_once():
    base, tokenizer = tiny_model_and_tokenizer(seed=3)
    other, _ = tiny_model_and_tokenizer(seed=4)
    gold = lambda prompt, completion: float(len(completion) % 3 == 0)  # noqa: E731
    sets = {"a": PROMPTS, "b": PROMPTS[:5]}
    results = compare_policies({"base": base, "other": other}, "base", tokenizer, sets, gold, max_new_tokens=5)
    for name, texts in sets.items():
        own, samples = evaluate_policy(base, tokenizer, texts, gold, reference=base, max_new_tokens=5)
        theirs, _ = evaluate_policy(other, tokenizer, texts, gold, reference=base, baseline=samples, max_new_tokens=5)
        assert results["other"][name] == theirs
        assert results["base"][name] == {**own, "kl_to_reference": 0.0, "win_rate": 0.5}
