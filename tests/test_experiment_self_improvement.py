"""`alignkit experiment self-improvement`: every loop from one SFT model, scored along the way, at equal budgets."""

import json
import math

import pytest

from alignkit.cli import main
from alignkit.experiments.self_improvement import METHODS, SETTINGS, loop_config, uses_reward_model
from alignkit.train.rundir import RunDir

pytestmark = pytest.mark.usefixtures("one_torch_thread")
QUICK = SETTINGS[True]
METRICS = ("gold", "gold_gain", "kl_to_sft", "sqrt_kl", "judge_calls", "completions", "comparisons")


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("experiment")
    assert main(["experiment", "self-improvement", "--quick", "--seeds", "0", "--output-dir", str(out)]) == 0
    (run,) = out.glob("experiment-self-improvement-*")
    assert (run / "gold.svg").exists() and (run / "gold_gain.svg").exists()
    return [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]


def test_every_method_is_scored_from_the_sft_model_at_each_checkpoint(rows):
    steps = list(range(0, QUICK["steps"] + 1, QUICK["eval_every"]))
    for name in METHODS:
        assert [r["step"] for r in rows if r["method"] == name] == steps, name
    assert all(math.isfinite(r[m]) for r in rows for m in METRICS)
    starts = [r for r in rows if r["step"] == 0]
    assert len({r["gold"] for r in starts}) == 1 and all(abs(r["kl_to_sft"]) < 1e-3 for r in starts)


def test_methods_spend_equal_completions_and_only_the_ranked_ones_call_the_reward_model(rows):
    final = {r["method"]: r for r in rows if r["step"] == QUICK["steps"]}
    budget = QUICK["steps"] * QUICK["completions_per_step"]
    assert {r["completions"] for r in final.values()} == {budget}
    ranked = {name for name, (recipe, _, _) in METHODS.items() if uses_reward_model(recipe)}
    assert ranked == {"offline DPO", "online DPO", "iterative DPO", "SPPO", "RAFT"}
    for name, row in final.items():   # one score per answer; the self-rewarding LM judges its own
        assert row["judge_calls"] == (budget if name in ranked | {"self-rewarding LM"} else 0), name
    offline = [r for r in rows if r["method"] == "offline DPO" and r["step"] > 0]
    assert all(r["judge_calls"] == budget for r in offline)   # one pass, judged before the first step


def test_a_loop_that_built_no_comparisons_leaves_the_sft_model_as_it_was(rows):
    start = next(r["gold"] for r in rows if r["step"] == 0)
    for row in rows:
        if row["comparisons"] == 0:
            assert row["gold"] == start and row["gold_gain"] == 0, row
    moved = {r["method"] for r in rows if r["step"] == QUICK["steps"] and r["comparisons"] > 0}
    assert moved >= {"offline DPO", "online DPO", "iterative DPO", "SPPO", "SPIN", "CREAM", "RAFT"}


def test_a_budget_that_a_group_size_does_not_divide_is_refused(tmp_path):
    with pytest.raises(ValueError, match="multiple of its group size 4"):
        loop_config("iterative DPO", {**QUICK, "completions_per_step": 30}, {}, RunDir(tmp_path), 0)
