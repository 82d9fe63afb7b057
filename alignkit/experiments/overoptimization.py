"""Reward-model overoptimization: gold against proxy reward as the policy moves away from its start.

The claim (Gao et al., arXiv 2210.10760): optimising a learned reward model raises the proxy reward
steadily while the gold reward rises, peaks and falls, as a function of d = sqrt(KL(pi || pi_init)).
Reward-model ensembles (Coste et al., arXiv 2310.02743) delay or soften the fall. Here, per seed:
the demo's base and SFT models on the synthetic language; K Bradley-Terry reward models trained on
the same comparisons with different head initialisations and data orders; GRPO with no KL penalty
against (a) the first reward model alone and (b) the ensemble's mean and (c) its minimum (worst
case). Every `save_every` steps the policy is scored on held-out prompts: gold reward, proxy reward
(what it optimised, on the same samples) and KL to the SFT model (`evaluation/policy.py`).
"""

from __future__ import annotations

import copy
import math
import statistics
from pathlib import Path

import torch

from alignkit.demo import MAX_NEW_TOKENS, offline_stage, online_stage, pretrain_base, sft_stage
from alignkit.evaluation.policy import kl_to_reference, sample_policy
from alignkit.experiments.base import EXPERIMENTS
from alignkit.models import tiny_reward_model
from alignkit.rewards.models import Ensemble, RewardModel
from alignkit.rollout.base import SamplingConfig
from alignkit.tasks import LanguageTask
from alignkit.train.checkpoint import restore_weights
from alignkit.train.rundir import RunDir

SETTINGS = {
    False: {"pretrain_steps": 600, "sft_steps": 200, "comparisons": 1000, "rm_steps": 100, "members": 3,
            "rl_steps": 100, "save_every": 10, "prompts": 200},
    True: {"pretrain_steps": 250, "sft_steps": 80, "comparisons": 500, "rm_steps": 50, "members": 2,
           "rl_steps": 20, "save_every": 10, "prompts": 100},
}


def _reward_models(run: RunDir, sft, tokenizer, setting: dict, seed: int) -> list:
    members = []
    for i in range(setting["members"]):
        model = tiny_reward_model(sft)
        with torch.random.fork_rng():
            torch.manual_seed(1000 * seed + i)
            torch.nn.init.normal_(model.score.weight, std=0.02)
        result = offline_stage(run, f"rm-{i}", "reward", {"task_size": setting["comparisons"], "seed": seed},
                               {"steps": setting["rm_steps"], "lr": 1e-3, "seed": 1000 * seed + i, "progress": False},
                               model, tokenizer)
        members.append((result.run.path, RewardModel(result.model, tokenizer)))
    return members


def _curve(run_path: Path, name: str, sft, reward, tokenizer, prompts: list[str], seed: int) -> list[dict]:
    task, rows = LanguageTask(), []
    checkpoints = sorted((run_path / "checkpoints").glob("step-*"))
    for step, checkpoint in [(0, None)] + [(int(c.name.split("-")[1]), c) for c in checkpoints]:
        policy = copy.deepcopy(sft)
        if checkpoint is not None:
            restore_weights(policy, checkpoint)
        samples = sample_policy(policy, tokenizer, prompts, task.gold_reward,
                                SamplingConfig(max_new_tokens=MAX_NEW_TOKENS), seed)
        proxy = reward.score(prompts, [c.text for c in samples.completions]).values.float().mean()
        kl = max(kl_to_reference(samples, sft, tokenizer.pad_token_id), 0.0)
        rows.append({"reward model": name, "step": step, "sqrt_kl": math.sqrt(kl),
                     "gold": statistics.fmean(samples.gold), "proxy": float(proxy)})
    return rows


@EXPERIMENTS.register(
    "overoptimization", summary="gold against proxy reward as KL grows, one reward model against an ensemble",
    paper="Gao et al. 2022, arXiv 2210.10760; Coste et al. 2023, arXiv 2310.02743",
    group=("reward model", "step"), metrics=("sqrt_kl", "gold", "proxy"),
    plots=[{"x": "sqrt_kl", "y": "gold", "title": "Gold reward against sqrt(KL to SFT)",
            "x_label": "sqrt(KL(pi || pi_SFT)), nats^0.5", "y_label": "gold reward"},
           {"x": "sqrt_kl", "y": "proxy", "title": "Proxy reward (what RL optimised) against sqrt(KL to SFT)",
            "x_label": "sqrt(KL(pi || pi_SFT)), nats^0.5", "y_label": "proxy reward"}])
def overoptimization(seed: int, quick: bool, workdir: Path) -> list[dict]:
    setting, task = SETTINGS[quick], LanguageTask()
    run = RunDir(workdir)
    base, tokenizer = pretrain_base(run, "base", setting["pretrain_steps"], seed, progress=False)
    sft = sft_stage(run, "sft", base, tokenizer, 1000, setting["sft_steps"], seed, progress=False)
    members = _reward_models(run, sft, tokenizer, setting, seed)
    specs = [f"rm:{path}" for path, _ in members]
    sources = {"single": (specs[0], members[0][1])}
    for aggregate in ("mean", "min"):
        spec = {"kind": "ensemble", "members": specs, "aggregate": aggregate}
        sources[f"ensemble {aggregate}"] = (spec, Ensemble([m for _, m in members], aggregate=aggregate))
    prompts = [p.prompt for p in task.prompts(setting["prompts"], seed=seed + 20_000, split="eval")]
    rows = []
    for name, (spec, reward) in sources.items():
        rl = {"steps": setting["rl_steps"], "prompts_per_step": 16, "group_size": 8, "lr": 2e-4, "kl_coef": 0.0,
              "save_every": setting["save_every"], "keep_checkpoints": 1000, "seed": seed}
        stage = f"grpo-{name.replace(' ', '-')}"
        online_stage(run, stage, "grpo", spec, rl, copy.deepcopy(sft), tokenizer, reward, seed)
        rows += _curve(run.path / stage, name, sft, reward, tokenizer, prompts, seed)
    return rows
