"""Self-rewarding LMs (Yuan et al. arXiv 2401.10020) on a tiny model that was taught to judge.

The paper's M1 is fine-tuned on instruction data (IFT) and on judgements (EFT) before it rewards
itself. Here the tiny model gets one SFT on single-digit sums and on additive-rubric judgements of
right sums and near misses, each judgement restating the sum and the answer before "Score: 5" or
"Score: 0". Its judgements then parse, so the loop's rounds hold comparisons. What does not hold yet
at this size: the judge is barely better than chance (0.62 of 100 right-versus-near-miss pairs ranked
right; on its own samples it calls 70% of right answers and 52% of wrong ones right), and 100
self-rewarding steps (lr 1e-4, 4 per round) took greedy held-out accuracy from 0.11 to 0.0, so there
is no gold-reward test here. With twice the judgements and three epochs the judge reached 0.645 and
the loop still fell from 0.295 to 0.0, where gold-reward iterative DPO from that model reached 0.345.
"""

import copy
import json

import pytest

from alignkit.config import build
from alignkit.judges.templates import pointwise_messages
from alignkit.models.tiny import tiny_model, tiny_tokenizer
from alignkit.tasks import TASKS
from alignkit.train.recipes import RunConfig, train
from alignkit.train.rl import config_from, run_rl

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

# The rubric is longer than a tiny model can attend across; the prompt is cut from the left to its
# question, answer and closing instruction, in SFT and in the loop alike.
TOKENIZE = {"max_prompt_length": 160, "max_length": 192}
TASK = {"task": "arithmetic", "task_options": {"max_operand": 9}}


def judgement_records(task, n: int, seed: int) -> list[dict]:
    pairs, _ = task.comparisons(n // 2, seed=seed)
    return [{"prompt": pointwise_messages("additive", pair.prompt, answer, 0, 5),
             "completion": f"{pair.prompt}{task.answer(pair.prompt)}, answer {answer}\nScore: {score}"}
            for pair in pairs for answer, score in ((pair.chosen, 5), (pair.rejected, 0))]


def test_an_ift_eft_model_judges_itself_parsably_and_its_rounds_hold_comparisons(tmp_path):
    task = TASKS.get("arithmetic").fn(max_operand=9)
    records = [{"prompt": d.prompt, "completion": d.completion} for d in task.demonstrations(2000, 0)]
    records += judgement_records(task, 2000, seed=1)
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    sft = build(RunConfig, {"data": {"train": str(tmp_path / "sft.jsonl"), "eval_fraction": 0.05, "tokenize": TOKENIZE},
                            "train": {"epochs": 2, "lr": 3e-3, "batch_size": 32, "progress": False},
                            "output_dir": str(tmp_path / "sft")})
    tokenizer = tiny_tokenizer()
    model = train(sft, "sft", model=tiny_model(), tokenizer=tokenizer).model

    cfg = config_from({"recipe": "self-rewarding-lm", "output_dir": str(tmp_path / "rl"),
                       "data": {**TASK, "task_size": 1000, "eval_size": 20, "tokenize": TOKENIZE},
                       "rollout": {"max_new_tokens": 4}, "train": {"steps": 8, "lr": 1e-4, "progress": False},
                       "rl": {"prompts_per_step": 16}, "comparisons": {"steps_per_round": 4}})
    result = run_rl(cfg, model=copy.deepcopy(model), tokenizer=tokenizer)
    rounds = [row for row in result.run.metrics() if "train/comparisons" in row]
    assert len(rounds) == 2
    for row in rounds:
        assert row["train/reward/failures"] <= 0.05 * row["train/reward/items"]   # measured 1 of 256
        assert row["train/comparisons"] >= 4                                        # measured 7
