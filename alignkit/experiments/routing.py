"""Uncertainty routing: a fast preference model sends the pairs it is least sure of to a strong judge.

The claim (Xu et al., arXiv 2510.20369): at the same number of strong-judge calls, routing the pairs
that a pairwise preference model with SNGP uncertainty is most uncertain about beats routing pairs
at random (algorithms.md section 2.3). Here, per seed and per training-set size: an SNGP preference
model (`alignkit pairwise-rm` on the tiny model, 300 steps of 16 at lr 5e-4, rff_std 0.5) trained on
the synthetic language's comparisons, whose labels are sampled Bradley-Terry from the hidden gold
reward. It judges held-out pairs, half with in-distribution prompts and half with prompts ending in
a word that training prompts never end in ("ood"). `UncertaintyRouter` sends a share q of them (the
budget: ceil(q n) pairs, one batch) to the strong judge, the gold reward as a Bradley-Terry judge
(an oracle), chosen by one rule:

- top_q: the largest SNGP uncertainty u (the paper's rule, as a budget);
- least_confident: P(a > b) nearest 1/2 (needs no uncertainty estimate);
- random: uniformly at random (the paper's baseline).

Accuracy is agreement with the gold ordering; held-out pairs whose answers have equal gold reward
are left out. `errors_fixed` is the share of the fast model's wrong answers that routing corrected;
`accuracy_gain` is accuracy minus random routing's for the same seed, training set and budget.
"""

from __future__ import annotations

from pathlib import Path

import torch

from alignkit.config import build
from alignkit.experiments.base import EXPERIMENTS
from alignkit.models import PreferenceModel, tiny_model_and_tokenizer
from alignkit.rewards import Preference, PreferenceModelJudge, RewardComparison
from alignkit.rewards.routing import UncertaintyRouter
from alignkit.sources import build_source
from alignkit.tasks import LanguageTask
from alignkit.train import RunConfig, train

RULES = ("top_q", "least_confident", "random")
SETTINGS = {
    False: {"sizes": (200, 600, 2000), "steps": 300, "held_out": 300, "budgets": (0.0, 0.1, 0.2, 0.3, 0.5, 1.0)},
    True: {"sizes": (200,), "steps": 150, "held_out": 100, "budgets": (0.0, 0.2, 1.0)},
}


class Replay:
    """A pairwise judge that answers one fixed batch with answers computed once: the fast model
    judges the same pairs under every rule and budget, so it runs once."""

    def __init__(self, judge, prompts: list, a: list[str], b: list[str]):
        self.batch, self.answer, self.stats = (prompts, a, b), judge.compare(prompts, a, b), judge.stats

    def compare(self, prompts, a, b) -> Preference:
        if (list(prompts), list(a), list(b)) != self.batch:
            raise ValueError("Replay answers only the batch it was built with")
        return self.answer


def _preference_model(workdir: Path, size: int, steps: int, seed: int):
    lm, tokenizer = tiny_model_and_tokenizer(seed=seed)
    cfg = build(RunConfig, {"output_dir": str(workdir), "run_name": f"pairwise-rm-{size}",
                            "model": {"pairwise": {"rff_std": 0.5}},
                            "data": {"task": "language", "task_size": size, "eval_size": 100, "seed": seed},
                            "train": {"steps": steps, "batch_size": 16, "lr": 5e-4, "seed": seed,
                                      "progress": False}})
    model = PreferenceModel.from_causal_lm(lm, cfg.model.pairwise)
    return train(cfg, "pairwise-rm", model=model, tokenizer=tokenizer).model, tokenizer


def held_out_pairs(n: int, seed: int) -> tuple[list, list, list, torch.Tensor]:
    """n in-distribution and n "ood" pairs without gold ties: prompts, answers a and b, gold says a > b."""
    task = LanguageTask()
    pairs = [p for split in ("eval", "ood") for p in task.comparisons(n, seed + 20_000, split=split)[0]]
    margins = [task.gold_reward(p.prompt, p.chosen) - task.gold_reward(p.prompt, p.rejected) for p in pairs]
    kept = [(p, m) for p, m in zip(pairs, margins, strict=True) if m != 0]
    return ([p.prompt for p, _ in kept], [p.chosen for p, _ in kept], [p.rejected for p, _ in kept],
            torch.tensor([m > 0 for _, m in kept]))


def _correct(probs: torch.Tensor, a_wins: torch.Tensor) -> torch.Tensor:
    """1 where the judge's verdict matches the gold ordering, 1/2 for an exact 1/2."""
    right = ((probs > 0.5) == a_wins).float()
    return torch.where(probs == 0.5, torch.full_like(right, 0.5), right)


def _route(fast: Replay, strong, pairs: tuple, a_wins: torch.Tensor, rule: str, budget: float, seed: int) -> dict:
    router = UncertaintyRouter(fast, strong, rule=rule, q=budget, seed=seed)
    correct = _correct(router.compare(*pairs).probs, a_wins)
    fast_correct = _correct(fast.answer.probs, a_wins)
    fixed = ((correct - fast_correct).clamp(min=0).sum() / (1 - fast_correct).sum()).item()
    return {"accuracy": correct.mean().item(), "judge_call_fraction": router.metrics()["router/judge_call_fraction"],
            "errors_fixed": fixed}


@EXPERIMENTS.register(
    "routing", summary="SNGP-uncertainty routing to a strong judge against random routing at equal budget",
    paper="Xu et al. 2025, arXiv 2510.20369", group=("router", "budget"),
    metrics=("accuracy", "accuracy_gain", "judge_call_fraction", "errors_fixed"),
    plots=[{"x": "budget", "y": "accuracy", "title": "Held-out preference accuracy against judge budget",
            "x_label": "share of pairs sent to the strong judge", "y_label": "accuracy (gold ordering)"},
           {"x": "budget", "y": "accuracy_gain", "title": "Accuracy gain over random routing at the same budget",
            "x_label": "share of pairs sent to the strong judge", "y_label": "accuracy minus random routing's"}])
def routing(seed: int, quick: bool, workdir: Path) -> list[dict]:
    setting = SETTINGS[quick]
    *pairs, a_wins = held_out_pairs(setting["held_out"], seed)
    strong = RewardComparison(build_source("task:language"))
    rows = []
    for size in setting["sizes"]:
        model, tokenizer = _preference_model(workdir, size, setting["steps"], seed)
        fast = Replay(PreferenceModelJudge(model, tokenizer, batch_size=64), *pairs)
        for budget in setting["budgets"]:
            results = {rule: _route(fast, strong, pairs, a_wins, rule, budget, seed) for rule in RULES}
            rows += [{"router": f"{rule}, {size} pairs", "budget": budget, **result,
                      "accuracy_gain": result["accuracy"] - results["random"]["accuracy"]}
                     for rule, result in results.items()]
    return rows
