"""Self-improvement loops: every recipe from the CLI and Python, the round mechanism, invariance, resume."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import alignkit
from alignkit.cli import main
from alignkit.models.tiny import tiny_model, tiny_tokenizer
from alignkit.rewards.base import RewardComparison
from alignkit.rewards.rules import RuleReward
from alignkit.train.comparisons import ComparisonMethod
from alignkit.train.rl import RECIPES, config_from, run_rl

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SELF_IMPROVING = [e.name for e in RECIPES if e.fn().get("method") == "comparisons"]
ARITHMETIC = {"task": "arithmetic", "task_options": {"max_operand": 9}, "task_size": 64, "eval_size": 4}


def length(prompt, completion, reference):
    return float(len(completion))   # varies from the first step, unlike the gold reward of an untrained model


def loop_config(tmp_path, recipe: str, steps: int = 2, comparisons: dict | None = None, **rl):
    return config_from({"recipe": recipe, "output_dir": str(tmp_path), "data": ARITHMETIC,
                        "rollout": {"max_new_tokens": 4}, "train": {"steps": steps, "progress": False},
                        "rl": {"prompts_per_step": 4, **rl}, "comparisons": comparisons or {}})


def rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_all_self_improvement_recipes_are_registered():
    assert set(SELF_IMPROVING) == {"online-dpo", "iterative-dpo", "self-rewarding-lm", "cream", "spin", "sppo", "dno",
                                   "inpo", "nash-md", "raft", "rest", "rso"}


@pytest.mark.parametrize("recipe", SELF_IMPROVING)
def test_every_recipe_runs_from_the_cli_and_counts_its_round(tmp_path, recipe, capsys):
    assert main(["rl", "--recipe", recipe, "--model", "tiny", f"output_dir={tmp_path}", "run_name=run",
                 "data.task=arithmetic", "data.task_size=32", "data.eval_size=4", "rollout.max_new_tokens=4",
                 "train.steps=2", "train.progress=false", "rl.prompts_per_step=4", "comparisons.steps_per_round=1",
                 "comparisons.epochs=1"]) == 0
    logged = rows(tmp_path / "run")
    rounds = [r for r in logged if "train/comparisons" in r]
    assert [r["train/round"] for r in rounds] == [0, 1]
    assert all(r["train/prompts_without_comparisons"] <= 4 for r in rounds)
    assert (tmp_path / "run" / "model" / "config.json").exists()


def test_the_python_api_runs_a_loop_with_a_reward_object(tmp_path):
    result = alignkit.RL("online-dpo", model="tiny", reward=RuleReward(length), output_dir=str(tmp_path), steps=2,
                         prompts_per_step=4, max_new_tokens=4, task="arithmetic", task_size=32, eval_size=4,
                         progress=False).train()
    logged = rows(result.run_dir)
    assert any("train/comparison/loss" in r for r in logged), "pairs of unequal length were trained on"
    assert result.model_path.exists()


def test_a_round_judges_each_pair_once_and_steps_share_its_comparisons(tmp_path):
    cfg = loop_config(tmp_path, "iterative-dpo", steps=4, comparisons={"steps_per_round": 2, "rule": "all-pairs"},
                      group_size=3)
    judge = RewardComparison(RuleReward(length))
    result = run_rl(cfg, model=tiny_model(), tokenizer=tiny_tokenizer(), judge=judge)
    logged = rows(result.run.path)
    rounds = [r for r in logged if "train/comparisons" in r]
    assert [r["train/round"] for r in rounds] == [0, 1] and [r["step"] for r in rounds] == [1, 3]
    # 2 steps x 4 prompts per round, one comparison per unordered pair of 3 answers (Bradley-Terry scores both)
    assert all(r["train/judge/items"] == 2 * 8 * 3 for r in rounds)
    assert all(0 < r["train/comparisons"] <= 8 * 3 for r in rounds)


def _gradients(tmp_path, micro):
    """The first step's gradient of an iterative-DPO round, at micro-batch size `micro`."""
    torch.manual_seed(0)
    cfg = loop_config(tmp_path / str(micro), "iterative-dpo", steps=1, comparisons={"steps_per_round": 1,
                      "rule": "all-pairs"}, group_size=3)
    cfg.train.micro_batch_size = micro
    grads = {}
    original = ComparisonMethod.update_on

    def recording(method, items, loop):
        step = loop.apply_gradients

        def record():
            grads.update({n: p.grad.clone() for n, p in method.policy.named_parameters() if p.grad is not None})
            return step()

        loop.apply_gradients = record
        return original(method, items, loop)

    ComparisonMethod.update_on = recording
    try:
        run_rl(cfg, model=tiny_model(), tokenizer=tiny_tokenizer(), reward=RuleReward(length))
    finally:
        ComparisonMethod.update_on = original
    return grads


def test_micro_batching_does_not_change_the_gradient(tmp_path):
    whole, single = _gradients(tmp_path, None), _gradients(tmp_path, 1)
    assert whole and any(g.abs().sum() > 0 for g in whole.values())
    for name, grad in whole.items():
        torch.testing.assert_close(single[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_run_stopped_mid_round_resumes_on_the_same_comparisons(tmp_path):
    def run(root, resume=None):
        cfg = loop_config(root, "iterative-dpo", steps=4, comparisons={"steps_per_round": 4})
        cfg.run_name, cfg.train.save_every, cfg.train.lr = "run", 2, 1e-3
        return run_rl(cfg, resume=resume, model=tiny_model(), tokenizer=tiny_tokenizer(),
                      reward=RuleReward(length)).run.path

    straight = run(tmp_path / "straight")
    stopped = tmp_path / "stopped" / "run"
    shutil.copytree(straight, stopped)
    shutil.rmtree(stopped / "checkpoints" / "step-0000004")
    (stopped / "checkpoints" / "latest").unlink()   # as if killed after step 2, mid-round
    shutil.rmtree(stopped / "model")
    run(tmp_path / "stopped", resume=stopped)
    ours, theirs = (load_file(p / "model" / "model.safetensors") for p in (straight, stopped))
    for name, weight in ours.items():
        assert torch.equal(theirs[name], weight), name
    assert [r["train/round"] for r in rows(stopped) if "train/comparisons" in r] == [0], "no second round was built"


def test_spin_needs_reference_answers_and_uses_no_reward(tmp_path):
    result = run_rl(loop_config(tmp_path, "spin", steps=1, comparisons={"steps_per_round": 1}),
                    model=tiny_model(), tokenizer=tiny_tokenizer())
    round_row = next(r for r in rows(result.run.path) if "train/comparisons" in r)
    assert round_row["train/comparisons"] == 4 and "train/reward/calls" not in round_row


def test_a_rule_that_ranks_without_a_reward_or_judge_is_refused(tmp_path):
    cfg = loop_config(tmp_path, "online-dpo")
    cfg.reward = None
    with pytest.raises(ValueError, match="reward source or a judge"):
        run_rl(cfg, model=tiny_model(), tokenizer=tiny_tokenizer())


def test_a_single_answer_rule_with_a_pair_loss_is_refused(tmp_path):
    with pytest.raises(ValueError, match="single comparisons"):
        run_rl(loop_config(tmp_path, "raft", comparisons={"loss": "dpo"}), model=tiny_model(),
               tokenizer=tiny_tokenizer(), reward=RuleReward(length))


def test_the_self_rewarding_judge_is_the_policy_with_the_additive_rubric(tmp_path):
    result = run_rl(loop_config(tmp_path, "self-rewarding-lm", steps=1, comparisons={"steps_per_round": 1}),
                    model=tiny_model(), tokenizer=tiny_tokenizer())
    reward = result.method.reward
    assert reward.template == "additive" and reward.backend.generator is result.method.generator
    round_row = next(r for r in rows(result.run.path) if "train/comparisons" in r)
    assert round_row["train/reward/items"] == 4 * 4   # every sample judged once


def test_best_of_n_writes_each_prompts_best_completion_and_its_scores(tmp_path, capsys):
    rewards = tmp_path / "rewards.py"
    rewards.write_text("def length(prompt, completion, reference):\n    return float(len(completion))\n\n"
                       "def broken(prompt, completion, reference):\n    raise RuntimeError('no score')\n")
    out = tmp_path / "best.jsonl"
    args = ["best-of-n", "--model", "tiny", "data.task=arithmetic", "data.task_size=6", "n=4",
            "rollout.max_new_tokens=6", f"output={out}"]
    assert main([*args, f"reward=rule:{rewards}:length"]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(written) == 6 and all(len(row["scores"]) == 4 for row in written)
    for row in written:
        assert row["score"] == max(row["scores"]) == len(row["completion"]) and not row["failed"]
    assert main([*args, f"reward=rule:{rewards}:broken"]) == 0
    assert all(row["failed"] for row in map(json.loads, out.read_text().splitlines()))
    assert "failed" in capsys.readouterr().out


def test_nash_md_judges_each_sample_against_its_mixture_alternative(tmp_path):
    judge = RewardComparison(RuleReward(length))
    result = run_rl(loop_config(tmp_path, "nash-md", steps=1), model=tiny_model(), tokenizer=tiny_tokenizer(),
                    judge=judge)
    round_row = next(r for r in rows(result.run.path) if "train/comparisons" in r)
    # 4 prompts x 2 samples, each compared once with its own mixture sample (Bradley-Terry scores both)
    assert round_row["train/judge/items"] == 2 * 4 * 2 and round_row["train/comparisons"] == 4 * 2


def test_an_http_judge_ranks_a_round_and_its_cache_hits_are_logged(tmp_path):
    from alignkit.judges.backends import HTTPBackend
    from alignkit.judges.generative import GenerativeJudge
    from alignkit.serve import serving

    model, tokenizer = tiny_model(), tiny_tokenizer()
    with serving(tiny_model(), tiny_tokenizer()) as url:
        backend = HTTPBackend(url, timeout_s=30, retries=0, max_concurrency=2)
        judge = GenerativeJudge(backend, max_tokens=8, on_unparsable="abstain", swap=False)
        cfg = loop_config(tmp_path, "iterative-dpo", steps=2, comparisons={"steps_per_round": 1},
                          group_size=2, max_failure_rate=1.0)
        cfg.rollout.temperature, cfg.data.task_size, cfg.train.lr = 0.0, 4, 1e-12   # round 2 asks round 1's pairs
        result = run_rl(cfg, model=model, tokenizer=tokenizer, judge=judge)
    rounds = [r for r in rows(result.run.path) if "train/comparisons" in r]
    assert [r["train/judge/items"] for r in rounds] == [4, 4]
    assert rounds[0]["train/judge/cache_hits"] == 0
    assert rounds[-1]["train/judge/cache_hits"] == backend.cache_hits == 4


def test_cream_logs_the_consistency_of_its_rankings(tmp_path):
    cfg = loop_config(tmp_path, "cream", steps=2, comparisons={"steps_per_round": 1})
    result = run_rl(cfg, model=tiny_model(), tokenizer=tiny_tokenizer())
    rounds = [r for r in rows(result.run.path) if "train/comparisons" in r]
    assert rounds[0]["train/comparison/consistency"] == 1.0   # no previous ranking in the first round
    assert 0 <= rounds[1]["train/comparison/consistency"] <= 1


def test_the_api_examples_of_the_loops_resolve_their_keywords(tmp_path):
    prompts = [{"prompt": f"{a}+{b}=", "reference": str(a + b)} for a in range(4) for b in range(4)]
    judge = RewardComparison(RuleReward(length))
    result = alignkit.RL("iterative-dpo", data=prompts, judge=judge, steps_per_round=2, loss_options={"beta": 0.2},
                         steps=2, prompts_per_step=4, max_new_tokens=4, output_dir=str(tmp_path),
                         progress=False).train()
    config = (result.run_dir / "config.yaml").read_text()
    assert "steps_per_round: 2" in config and "beta: 0.2" in config
    assert [r["train/round"] for r in rows(result.run_dir) if "train/comparisons" in r] == [0]


def test_answers_whose_score_failed_are_never_ranked(tmp_path):
    def even_only(prompt, completion, reference):
        return float(len(completion)) if len(completion) % 2 == 0 else None   # odd lengths: a failed score

    cfg = loop_config(tmp_path, "iterative-dpo", steps=1, comparisons={"steps_per_round": 1, "rule": "all-pairs"},
                      group_size=4, max_failure_rate=1.0)
    cfg.rollout.max_new_tokens = 6
    tokenizer = tiny_tokenizer()
    result = run_rl(cfg, model=tiny_model(), tokenizer=tokenizer, reward=RuleReward(even_only))
    assert result.method.reward.stats.failures > 0 and result.method.items
    for item in result.method.items:
        for answer in (item.chosen, item.rejected):
            assert len(tokenizer.decode(answer, skip_special_tokens=True)) % 2 == 0
