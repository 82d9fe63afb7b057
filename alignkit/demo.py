"""The embedded default: every kind of feedback on one task with a hidden gold reward, in minutes on a CPU.

On the built-in synthetic language (`tasks/language.py`): pretrain a tiny base model on the task's
corpus, SFT it on demonstrations, train a Bradley-Terry reward model on comparisons, then align the
SFT model three ways: DPO on the comparisons, GRPO on the reward model, and Self-Rewarding PPO on
log pi_SFT - log pi_base (no preference data at all). Every model is then scored on held-out prompts
by the gold reward the learners never saw, with its KL to the SFT model and its win rate against it
(`evaluation/policy.py`). The table goes to the terminal and to `evaluation.json`, and the stage
runs with their metrics to `report.html`, all in one directory.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkit.config import build
from alignkit.evaluation.policy import compare_policies
from alignkit.models import tiny_model_and_tokenizer, tiny_reward_model
from alignkit.report import build_report, write_evaluation
from alignkit.rewards.implicit import ImplicitReward
from alignkit.rewards.models import RewardModel
from alignkit.rewards.transforms import RunningNorm, Transformed
from alignkit.tasks import LanguageTask
from alignkit.train.recipes import RunConfig, train
from alignkit.train.rl import RECIPES, RL_TRAIN_DEFAULTS, RLRunConfig, run_rl, split_options
from alignkit.train.rundir import RunDir

MAX_NEW_TOKENS = 16  # four two-letter words, three spaces and EOS fit in 12


@dataclass
class DemoSize:
    """Examples and optimizer steps per stage; the full demo takes about 2 minutes on 2 CPU cores."""

    pretrain_steps: int = 600
    demonstrations: int = 1000
    sft_steps: int = 200
    comparisons: int = 3000
    reward_steps: int = 200
    dpo_steps: int = 200
    grpo_steps: int = 60
    srppo_steps: int = 60
    eval_prompts: int = 300


SIZES = {
    "full": DemoSize(),
    "quick": DemoSize(reward_steps=100, dpo_steps=100, grpo_steps=30, srppo_steps=30, eval_prompts=150),
}


@dataclass
class DemoResult:
    path: Path
    rows: dict[str, dict[str, float]]
    seconds: dict[str, float] = field(default_factory=dict)


def offline_stage(run: RunDir, name: str, command: str, data: dict, train_options: dict, model, tokenizer,
             loss: dict | None = None):
    cfg = build(RunConfig, {"output_dir": str(run.path), "run_name": name, "loss": loss or {},
                            "data": {"task": "language", "eval_size": 200, **data},
                            "train": {"batch_size": 32, "warmup_steps": 10, **train_options}})
    return train(cfg, command, model=model, tokenizer=tokenizer)


def online_stage(run: RunDir, name: str, recipe: str, reward_spec: str, rl: dict, model, tokenizer, reward,
                 seed: int = 0):
    train_options, rl = split_options(rl)
    cfg = build(RLRunConfig, {"recipe": recipe, "output_dir": str(run.path), "run_name": name, "reward": reward_spec,
                              "data": {"task": "language", "task_size": 2000, "eval_size": 100, "seed": seed},
                              "rollout": {"max_new_tokens": MAX_NEW_TOKENS},
                              "train": {**RL_TRAIN_DEFAULTS, **train_options},
                              "rl": {**RECIPES.call(recipe)["rl"], **rl}})
    return run_rl(cfg, model=model, tokenizer=tokenizer, reward=reward).method.policy


def frozen(model):
    return copy.deepcopy(model).eval().requires_grad_(False)


def pretrain_base(run: RunDir, name: str, steps: int, seed: int, progress: bool = True):
    """A tiny model pretrained on the language task's corpus, and its tokenizer."""
    model, tokenizer = tiny_model_and_tokenizer(seed=seed)
    base = offline_stage(run, name, "sft", {"task_corpus": True, "task_size": 4000, "seed": seed},
                         {"steps": steps, "lr": 3e-3, "seed": seed, "progress": progress}, model, tokenizer).model
    return base, tokenizer


def sft_stage(run: RunDir, name: str, base, tokenizer, demonstrations: int, steps: int, seed: int,
              progress: bool = True):
    return offline_stage(run, name, "sft", {"task_size": demonstrations, "seed": seed},
                         {"steps": steps, "lr": 3e-4, "seed": seed, "progress": progress},
                         copy.deepcopy(base), tokenizer).model


def self_rewarding_ppo(run: RunDir, name: str, base, sft, tokenizer, steps: int, seed: int):
    """PPO from the SFT model on log pi_SFT - log pi_base (running-normalised), k1 KL 0.2 to SFT in the reward.

    The small lr and the strong KL are what keep the implicit reward honest here. With KL 0.05 or
    0.1 the policy could find what the two models disagree on most, where both give almost no
    probability (a fifth word, past where every training text ends), and gold reward fell to 0.38-0.41."""
    implicit = Transformed(ImplicitReward(frozen(sft), frozen(base), tokenizer), RunningNorm())
    return online_stage(run, name, "self-rewarding-ppo", "srppo",
                        {"steps": steps, "prompts_per_step": 64, "lr": 5e-5, "kl_coef": 0.2, "seed": seed},
                        copy.deepcopy(sft), tokenizer, implicit, seed)


def train_models(run: RunDir, size: DemoSize, seed: int, stage) -> dict:
    """base -> SFT -> reward model -> {DPO, GRPO, Self-Rewarding PPO}; returns the policies by name."""
    with stage("pretrain base", "pretrain a tiny base model on the task's corpus"):
        base, tokenizer = pretrain_base(run, "1-base", size.pretrain_steps, seed)
    with stage("SFT", "SFT on demonstrations"):
        sft = sft_stage(run, "2-sft", base, tokenizer, size.demonstrations, size.sft_steps, seed)
    with stage("reward model", "Bradley-Terry reward model on comparisons"):
        rm_run = offline_stage(run, "3-reward-model", "reward", {"task_size": size.comparisons, "seed": seed},
                          {"steps": size.reward_steps, "lr": 1e-3, "seed": seed}, tiny_reward_model(sft), tokenizer)
    with stage("DPO", "DPO on the comparisons"):
        dpo = offline_stage(run, "4-dpo", "preference", {"task_size": size.comparisons, "seed": seed},
                       {"steps": size.dpo_steps, "lr": 1e-4, "batch_size": 16, "seed": seed},
                       copy.deepcopy(sft), tokenizer, loss={"name": "dpo", "beta": 0.1}).model
    with stage("GRPO", "GRPO on the reward model"):
        grpo = online_stage(run, "5-grpo", "grpo", f"rm:{rm_run.run.path}",
                       {"steps": size.grpo_steps, "prompts_per_step": 16, "group_size": 8, "lr": 1e-4,
                        "kl_coef": 0.05, "seed": seed},
                       copy.deepcopy(sft), tokenizer, RewardModel(rm_run.model, tokenizer), seed)
    with stage("Self-Rewarding PPO", "Self-Rewarding PPO on log pi_SFT - log pi_base"):
        srppo = self_rewarding_ppo(run, "6-self-rewarding-ppo", base, sft, tokenizer, size.srppo_steps, seed)
    return {"base": base, "SFT": sft, "DPO": dpo, "GRPO on RM": grpo, "Self-Rewarding PPO": srppo}, tokenizer


def evaluate_models(policies: dict, tokenizer, size: DemoSize, seed: int) -> dict[str, dict[str, float]]:
    """Gold reward in and out of distribution, KL to the SFT model and win rate against it."""
    task = LanguageTask()
    splits = {split: [p.prompt for p in task.prompts(size.eval_prompts, seed=seed + 20_000, split=split)]
              for split in ("eval", "ood")}
    results = compare_policies(policies, "SFT", tokenizer, splits, task.gold_reward, max_new_tokens=MAX_NEW_TOKENS,
                               seed=seed)
    return {name: {"gold": r["eval"]["gold_reward"], "gold greedy": r["eval"]["greedy_gold_reward"],
                   "gold ood": r["ood"]["gold_reward"], "KL to SFT": r["eval"]["kl_to_reference"],
                   "win vs SFT": r["eval"]["win_rate"]} for name, r in results.items()}


def _write_table(path: Path, title: str, rows: dict[str, dict[str, float]], seconds: dict[str, float]) -> None:
    columns = ["method", *next(iter(rows.values()))]
    table = [[name, *(round(v, 4) for v in values.values())] for name, values in rows.items()]
    write_evaluation(path, title, columns, table, stage_seconds=seconds)


class StageClock:
    """Numbered stage headers on the terminal and the wall time of each stage."""

    def __init__(self, total: int, echo):
        self.total, self.echo, self.seconds = total, echo, {}

    def __call__(self, name: str, title: str):
        return _Stage(self, name, title)


class _Stage:
    def __init__(self, clock: StageClock, name: str, title: str):
        self.clock, self.name, self.title = clock, name, title

    def __enter__(self):
        self.started = time.perf_counter()
        self.clock.echo(f"[{len(self.clock.seconds) + 1}/{self.clock.total}] {self.title}")

    def __exit__(self, *exc):
        self.clock.seconds[self.name] = round(time.perf_counter() - self.started, 1)


def run_demo(quick: bool = False, output_dir: str = "runs", seed: int = 0, echo=print) -> DemoResult:
    size = SIZES["quick" if quick else "full"]
    run = RunDir.create(output_dir, "demo")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 0.1M-parameter model runs fastest on one thread
    try:
        clock = StageClock(7, echo)
        policies, tokenizer = train_models(run, size, seed, clock)
        with clock("evaluate", "evaluate every model by the hidden gold reward"):
            rows = evaluate_models(policies, tokenizer, size, seed)
    finally:
        torch.set_num_threads(threads)
    _write_table(run.path, "alignkit demo: held-out gold reward", rows, clock.seconds)
    build_report([run.path], run.path / "report.html", title="alignkit demo")
    return DemoResult(run.path, rows, clock.seconds)
