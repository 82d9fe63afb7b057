"""Reward functions written for Hugging Face TRL load unchanged: fn(prompts, completions, completion_ids,
**columns) -> list[float | None], called once per batch with the dataset's other columns by name."""

import json

import pytest

from alignkit.rewards.rules import BatchRuleReward, RuleReward
from alignkit.sources import build_source

TRL_FUNCTIONS = '''
def reward_len(completions, **kwargs):
    return [-abs(5 - len(c)) for c in completions]

def accuracy(prompts, completions, completion_ids, solution, **kwargs):
    assert len(prompts) == len(completions) == len(completion_ids) == len(solution)
    assert all(isinstance(ids, list) and all(isinstance(t, int) for t in ids) for ids in completion_ids)
    return [1.0 if c.strip() == s else 0.0 for c, s in zip(completions, solution)]

def some_unscored(completions, **kwargs):
    return [None if i % 2 else 1.0 for i, _ in enumerate(completions)]

def broken(completions, **kwargs):
    raise ValueError("cannot score")

def too_short(completions, **kwargs):
    return [1.0]

def conversational(prompts, completions, **kwargs):
    return [float(len(c[0]["content"])) if c[0]["role"] == "assistant" else -1.0 for c in completions]

def per_sample(prompt, completion, reference):
    return float(len(completion))
'''


@pytest.fixture
def functions(tmp_path):
    path = tmp_path / "trl_rewards.py"
    path.write_text(TRL_FUNCTIONS)
    return path


def test_trl_signatures_load_as_batch_rewards_and_per_sample_ones_as_before(functions):
    assert isinstance(build_source(f"rule:{functions}:reward_len"), BatchRuleReward)
    assert isinstance(build_source(f"rule:{functions}:per_sample"), RuleReward)
    scores = build_source(f"rule:{functions}:reward_len").score(["p"] * 3, ["abc", "abcde", "abcdefgh"])
    assert scores.values.tolist() == [-2.0, 0.0, -3.0] and not scores.failure_mask().any()


def test_columns_and_completion_ids_are_passed_by_name(functions):
    reward = build_source(f"rule:{functions}:accuracy")
    scores = reward.score(["1+1=", "2+2="], ["2", "5"], tokens=[([1], [5, 6]), ([1], [7])],
                          columns=[{"solution": "2"}, {"solution": "4"}])
    assert scores.values.tolist() == [1.0, 0.0] and reward.stats.failures == 0


def test_none_means_no_score_and_a_failing_batch_fails_every_sample(functions):
    unscored = build_source(f"rule:{functions}:some_unscored")
    scores = unscored.score(["p"] * 4, ["a"] * 4)
    assert scores.failure_mask().tolist() == [False, True, False, True] and unscored.unscored == 2
    for name, message in (("broken", "ValueError: cannot score"), ("too_short", "not a list of 3 scores")):
        reward = build_source(f"rule:{functions}:{name}")
        assert reward.score(["p"] * 3, ["a"] * 3).failure_mask().all()
        assert reward.stats.failures == 3 and message in reward.stats.examples[0]


def test_conversational_prompts_get_assistant_messages_as_completions(functions):
    reward = build_source(f"rule:{functions}:conversational")
    scores = reward.score([[{"role": "user", "content": "hi"}]], ["hello"])
    assert scores.values.tolist() == [5.0]


def test_a_trl_reward_function_drives_grpo_on_a_prompt_file_with_a_solution_column(functions, tmp_path):
    from alignkit.models.tiny import tiny_model, tiny_tokenizer
    from alignkit.train.rl import config_from, run_rl

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "solution": str(i + 1)}) + "\n" for i in range(24)))
    cfg = config_from({"recipe": "grpo", "output_dir": str(tmp_path), "reward": f"rule:{functions}:accuracy",
                       "data": {"train": str(data)}, "rollout": {"max_new_tokens": 3},
                       "train": {"steps": 2, "progress": False}, "rl": {"prompts_per_step": 2, "group_size": 2}})
    result = run_rl(cfg, model=tiny_model(), tokenizer=tiny_tokenizer())
    rows = [r for r in result.run.metrics() if "train/reward/calls" in r]
    assert len(rows) == 2 and all(r["train/reward/failures"] == 0 for r in rows)
    assert all(r["train/reward/calls"] == 1 for r in rows), "one call per batch"
    held_out = result.method.eval_reward
    assert held_out.stats.calls > 0 and held_out.stats.failures == 0, "evaluation passes the columns too"
