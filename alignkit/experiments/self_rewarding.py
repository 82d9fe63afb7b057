"""Self-Rewarding PPO against its SFT model on out-of-distribution prompts, as demonstrations get scarce.

The claim (Zhang et al., arXiv 2510.21090): with few demonstrations, SFT generalises poorly, and PPO
on the implicit reward log pi_SFT - log pi_base, which draws on what the pretrained base knows,
does better out of distribution. Here, per seed: one base model pretrained on the synthetic
language's corpus; for each number of demonstrations, SFT on that many, then Self-Rewarding PPO
from it (the demo's settings). RL prompts are in-distribution; "ood" prompts end in the four words
that demonstrations never contain. Both models are scored by the hidden gold reward on the same
held-out prompts (one seeded sample each); win rate is against the SFT model it started from.
"""

from __future__ import annotations

from pathlib import Path

from alignkit.demo import MAX_NEW_TOKENS, pretrain_base, self_rewarding_ppo, sft_stage
from alignkit.evaluation.policy import compare_policies
from alignkit.experiments.base import EXPERIMENTS
from alignkit.tasks import LanguageTask
from alignkit.train.rundir import RunDir

SETTINGS = {
    False: {"demonstrations": (50, 200, 800), "pretrain_steps": 600, "sft_epochs": 6, "rl_steps": 60, "prompts": 300},
    True: {"demonstrations": (100,), "pretrain_steps": 250, "sft_epochs": 6, "rl_steps": 20, "prompts": 100},
}


def _score(policies: dict, tokenizer, prompts: dict[str, list[str]], seed: int) -> list[dict]:
    results = compare_policies(policies, "SFT", tokenizer, prompts, LanguageTask().gold_reward,
                               max_new_tokens=MAX_NEW_TOKENS, seed=seed)
    return [{"method": name, "gold_ood": r["ood"]["gold_reward"], "gold_in": r["in"]["gold_reward"],
             "win_ood": r["ood"]["win_rate"], "kl_to_sft": r["in"]["kl_to_reference"]} for name, r in results.items()]


@EXPERIMENTS.register(
    "self-rewarding-ppo",
    summary="Self-Rewarding PPO against SFT on out-of-distribution prompts, scarce demonstrations",
    paper="Zhang et al. 2025, arXiv 2510.21090", group=("method", "demonstrations"),
    metrics=("gold_ood", "gold_in", "win_ood", "kl_to_sft"),
    plots=[{"x": "demonstrations", "y": "gold_ood", "title": "Gold reward on out-of-distribution prompts",
            "x_label": "demonstrations", "y_label": "gold reward"},
           {"x": "demonstrations", "y": "gold_in", "title": "Gold reward on in-distribution prompts",
            "x_label": "demonstrations", "y_label": "gold reward"}])
def self_rewarding_vs_sft(seed: int, quick: bool, workdir: Path) -> list[dict]:
    setting, task = SETTINGS[quick], LanguageTask()
    run = RunDir(workdir)
    base, tokenizer = pretrain_base(run, "base", setting["pretrain_steps"], seed, progress=False)
    prompts = {name: [p.prompt for p in task.prompts(setting["prompts"], seed=seed + 20_000, split=split)]
               for name, split in (("ood", "ood"), ("in", "eval"))}
    rows = []
    for count in setting["demonstrations"]:
        steps = max(30, setting["sft_epochs"] * count // 32)
        sft = sft_stage(run, f"sft-{count}", base, tokenizer, count, steps, seed, progress=False)
        srppo = self_rewarding_ppo(run, f"srppo-{count}", base, sft, tokenizer, setting["rl_steps"], seed)
        rows += [{**row, "demonstrations": count}
                 for row in _score({"SFT": sft, "Self-Rewarding PPO": srppo}, tokenizer, prompts, seed)]
    return rows
