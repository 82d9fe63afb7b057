"""Self-improvement loops against each other at an equal budget of generated completions and judge calls.

Per seed, on the synthetic language (the demo's stages): a base model pretrained on the corpus, an
SFT model on demonstrations, and a Bradley-Terry reward model on the task's comparisons, which is
the judge of every loop that needs one; the hidden gold reward only scores. Every method starts
from the SFT model, trains on the SFT demonstrations' prompts for the same optimizer steps and
generates the same number of answers (prompts per step x group size = `completions_per_step`, with
each recipe's own group size). Offline DPO is iterative DPO with one round: one pass of generation
from the SFT model, judged once, then DPO on that fixed set. The loops that rank with the reward model
score each answer once, so they all spend the same calls; SPIN (demonstrations as the chosen
answers), CREAM and its ablation (the iterate's implicit reward) call no judge, and the
self-rewarding LM spends its own generations as judgements. At every `eval_every` steps each
policy is scored on held-out prompts: gold reward and KL to the SFT model (`evaluation/policy.py`),
against the judge calls, completions and comparisons spent so far.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
from pathlib import Path

from alignkit.demo import MAX_NEW_TOKENS, offline_stage, pretrain_base, sft_stage
from alignkit.evaluation.policy import kl_to_reference, sample_policy
from alignkit.experiments.base import EXPERIMENTS
from alignkit.models import tiny_reward_model
from alignkit.rewards.models import RewardModel
from alignkit.rollout.base import SamplingConfig
from alignkit.tasks import LanguageTask
from alignkit.train.checkpoint import restore_weights
from alignkit.train.rl import RECIPES, config_from, run_rl
from alignkit.train.rundir import RunDir

SETTINGS = {
    False: {"pretrain_steps": 600, "demonstrations": 1000, "sft_steps": 200, "comparisons": 3000, "rm_steps": 200,
            "steps": 96, "steps_per_round": 8, "completions_per_step": 80, "eval_every": 8, "prompts": 200},
    True: {"pretrain_steps": 150, "demonstrations": 200, "sft_steps": 60, "comparisons": 400, "rm_steps": 40,
           "steps": 4, "steps_per_round": 2, "completions_per_step": 20, "eval_every": 2, "prompts": 40},
}
LR = 1e-4

# method: (recipe, round length, comparisons.* on top of the recipe's)
METHODS = {
    "offline DPO": ("iterative-dpo", "all", {}),
    "online DPO": ("online-dpo", "one", {}),
    "iterative DPO": ("iterative-dpo", "round", {}),
    "SPPO": ("sppo", "round", {}),
    "SPIN": ("spin", "round", {}),
    "self-rewarding LM": ("self-rewarding-lm", "round", {}),
    "implicit self-reward": ("cream", "round", {"loss": "dpo", "consistency": "none"}),
    "CREAM": ("cream", "round", {}),
    "RAFT": ("raft", "round", {}),
}
ROUND_STEPS = {"all": lambda s: s["steps"], "one": lambda s: 1, "round": lambda s: s["steps_per_round"]}


def uses_reward_model(recipe: str) -> bool:
    """A recipe that sets no reward of its own ranks with the run's reward source: here the reward model."""
    return "reward" not in RECIPES.call(recipe)


def loop_config(name: str, setting: dict, files: dict[str, Path], run: RunDir, seed: int):
    recipe, rounds, comparisons = METHODS[name]
    group = RECIPES.call(recipe)["rl"]["group_size"]
    if setting["completions_per_step"] % group:
        raise ValueError(f"{name}: completions_per_step must be a multiple of its group size {group}")
    return config_from({
        "recipe": recipe, "output_dir": str(run.path), "run_name": name.replace(" ", "-"),
        "data": {"train": str(files["train"]), "eval": str(files["eval"]), "task": "language", "seed": seed},
        "eval_reward": "task",
        "rollout": {"max_new_tokens": MAX_NEW_TOKENS},
        "train": {"steps": setting["steps"], "lr": LR, "seed": seed, "progress": False,
                  "save_every": setting["eval_every"], "keep_checkpoints": 1000},
        "rl": {"prompts_per_step": setting["completions_per_step"] // group},
        "comparisons": {**comparisons, "steps_per_round": ROUND_STEPS[rounds](setting)}})


def spending(metrics: Path, step: int, round_completions: int) -> dict:
    """Judge calls (answers scored), completions and comparisons of the rounds started by `step`."""
    rounds = [r for r in map(json.loads, metrics.read_text().splitlines())
              if "train/round" in r and r["step"] <= step]
    calls = sum(r.get("train/reward/items", r.get("train/judge/items", 0)) for r in rounds)
    return {"judge_calls": calls, "completions": len(rounds) * round_completions,
            "comparisons": sum(r["train/comparisons"] for r in rounds)}


def score(policy, sft, tokenizer, prompts: list[str], seed: int) -> dict:
    samples = sample_policy(policy, tokenizer, prompts, LanguageTask().gold_reward,
                            SamplingConfig(max_new_tokens=MAX_NEW_TOKENS), seed)
    kl = kl_to_reference(samples, sft, tokenizer.pad_token_id)
    return {"gold": statistics.fmean(samples.gold), "kl_to_sft": kl, "sqrt_kl": math.sqrt(max(kl, 0.0))}


def curve(name: str, setting: dict, start: dict, sft, tokenizer, prompts: list[str], path: Path, seed: int):
    """The method's row at step 0 (the SFT model) and at each checkpoint."""
    _, rounds, _ = METHODS[name]
    round_completions = ROUND_STEPS[rounds](setting) * setting["completions_per_step"]
    rows = [{"method": name, "step": 0, **start, "judge_calls": 0, "completions": 0, "comparisons": 0}]
    for checkpoint in sorted((path / "checkpoints").glob("step-*"), key=lambda c: int(c.name.split("-")[1])):
        step, policy = int(checkpoint.name.split("-")[1]), copy.deepcopy(sft)
        restore_weights(policy, checkpoint)
        rows.append({"method": name, "step": step, **score(policy, sft, tokenizer, prompts, seed),
                     **spending(path / "metrics.jsonl", step, round_completions)})
    return [{**row, "gold_gain": row["gold"] - start["gold"]} for row in rows]


def prompt_files(folder: Path, setting: dict, seed: int) -> dict[str, Path]:
    """Training prompts: the SFT demonstrations, each with its demonstration as the reference answer (SPIN's
    chosen answers); a few held-out prompts for the loop's own evaluation, which no row here reads."""
    task = LanguageTask()
    records = {"train": [{"prompt": d.prompt, "reference": d.completion}
                         for d in task.demonstrations(setting["demonstrations"], seed=seed)],
               "eval": [{"prompt": p.prompt} for p in task.prompts(8, seed=seed + 10_000, split="eval")]}
    for name, rows in records.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {name: folder / f"{name}.jsonl" for name in records}


@EXPERIMENTS.register(
    "self-improvement", summary="self-improvement loops at an equal budget of completions and judge calls",
    paper="Guo et al. 2024, arXiv 2402.04792; Xiong et al. 2023, arXiv 2312.11456; Wu et al. 2024, arXiv 2405.00675; "
          "Chen et al. 2024, arXiv 2401.01335; Yuan et al. 2024, arXiv 2401.10020; Wang et al. 2024, arXiv 2410.12735; "
          "Dong et al. 2023, arXiv 2304.06767",
    group=("method", "step"),
    metrics=("gold", "gold_gain", "kl_to_sft", "sqrt_kl", "judge_calls", "completions", "comparisons"),
    plots=[{"x": "sqrt_kl", "y": "gold", "title": "Gold reward against sqrt(KL to the SFT model)",
            "x_label": "sqrt(KL(pi || pi_SFT)), nats^0.5", "y_label": "gold reward"},
           {"x": "judge_calls", "y": "gold_gain", "title": "Gold reward gain over SFT against judge calls",
            "x_label": "answers scored by the judge", "y_label": "gold reward minus SFT's (paired)"}])
def self_improvement(seed: int, quick: bool, workdir: Path) -> list[dict]:
    setting, task = SETTINGS[quick], LanguageTask()
    run = RunDir(workdir)
    base, tokenizer = pretrain_base(run, "base", setting["pretrain_steps"], seed, progress=False)
    sft = sft_stage(run, "sft", base, tokenizer, setting["demonstrations"], setting["sft_steps"], seed, progress=False)
    reward_model = offline_stage(run, "reward-model", "reward", {"task_size": setting["comparisons"], "seed": seed},
                                 {"steps": setting["rm_steps"], "lr": 1e-3, "seed": seed, "progress": False},
                                 tiny_reward_model(sft), tokenizer).model
    files = prompt_files(run.path, setting, seed)
    held_out = [p.prompt for p in task.prompts(setting["prompts"], seed=seed + 20_000, split="eval")]
    start = score(sft, sft, tokenizer, held_out, seed)
    rows = []
    for name, (recipe, _, _) in METHODS.items():
        judge = {"reward": RewardModel(reward_model, tokenizer)} if uses_reward_model(recipe) else {}
        result = run_rl(loop_config(name, setting, files, run, seed), model=copy.deepcopy(sft), tokenizer=tokenizer,
                        **judge)
        rows += curve(name, setting, start, sft, tokenizer, held_out, result.run.path, seed)
    return rows
