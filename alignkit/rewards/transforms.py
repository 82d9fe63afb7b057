"""Reward transforms (algorithms.md section 10), composable on any reward source.

Pure functions on tensors, plus `Transformed(source, *steps)`, a reward source that applies steps
in order. A step is any callable (values, prompts, completions) -> values; the stateful running
normaliser keeps its state for checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.registry import Registry
from alignkit.rewards.base import Prompt, RewardSource, Scores

Step = Callable[[Tensor, Sequence[Prompt], Sequence[str]], Tensor]
STEPS = Registry("reward transform")  # the steps a config or command line can name


def par(rewards: Tensor, reference_rewards: Tensor) -> Tensor:
    """Preference As Reward: mean_m sigma(r - r_ref,m), bounded in (0, 1) and centred.

    Fu et al. 2025 (arXiv 2502.18770); `reference_rewards` [n, M] scores M reference responses
    (sampled from the SFT policy) for each row's prompt.
    """
    return torch.sigmoid(rewards[:, None] - reference_rewards).mean(dim=1)


def log_sigmoid_centered(rewards: Tensor, reference: Tensor) -> Tensor:
    """log sigma(r - r_ref(x)), Wang et al. 2024 (arXiv 2402.00742); r_ref is per prompt [n]."""
    return F.logsigmoid(rewards - reference)


def reference_percentile(reference_rewards: Tensor, q: float = 0.85) -> Tensor:
    """The per-prompt reference reward r_ref(x) that paper suggests: a quantile of SFT samples' rewards."""
    return torch.quantile(reference_rewards, q, dim=1)


@STEPS.register("running_norm", summary="(r - mean) / std over every reward seen so far")
class RunningNorm:
    """(r - mean) / std over every reward seen so far (Welford), for stable PPO rewards."""

    def __init__(self, eps: float = 1e-8):
        self.count, self.mean, self.m2, self.eps = 0, 0.0, 0.0, eps

    def update(self, values: Tensor) -> None:
        for x in values.double().tolist():
            self.count += 1
            delta = x - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (x - self.mean)

    @property
    def std(self) -> float:
        return (self.m2 / self.count) ** 0.5 if self.count > 1 else 1.0

    def __call__(self, values: Tensor, prompts=None, completions=None) -> Tensor:
        self.update(values)
        return (values - self.mean) / (self.std + self.eps)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]


@STEPS.register("clip", summary="clamp rewards to [low, high]")
def clip(low: float, high: float) -> Step:
    return lambda values, prompts=None, completions=None: values.clamp(low, high)


@STEPS.register("length_penalty", summary="r - alpha * length (characters)")
def length_penalty(alpha: float, length: Callable[[str], int] = len) -> Step:
    """r - alpha * length(completion); characters by default, or pass a token counter."""
    def step(values, prompts, completions):
        lengths = torch.tensor([length(c) for c in completions], dtype=values.dtype)
        return values - alpha * lengths
    return step


class Transformed:
    """A reward source whose scores pass through `steps` in order; failures stay marked."""

    def __init__(self, source: RewardSource, *steps: Step):
        self.source, self.steps = source, steps
        self.stats = source.stats
        self.reads_tokens = getattr(source, "reads_tokens", False)

    def score(self, prompts, completions, references=None, **tokens) -> Scores:
        scores = self.source.score(prompts, completions, references, **tokens)
        values = scores.values
        for step in self.steps:
            values = step(values, prompts, completions)
        return Scores(values, scores.uncertainty, scores.failed)

    def _stateful(self) -> dict:
        return {str(i): step for i, step in enumerate(self.steps) if hasattr(step, "state_dict")}

    def state_dict(self) -> dict:
        """Running statistics of stateful steps, for checkpoints (a resumed run normalises identically)."""
        return {key: step.state_dict() for key, step in self._stateful().items()}

    def load_state_dict(self, state: dict) -> None:
        for key, step in self._stateful().items():
            step.load_state_dict(state[key])


def build_steps(config: list[dict | str]) -> list[Step]:
    """Steps from config: ["running_norm", {"clip": {"low": -5, "high": 5}}, {"length_penalty": {"alpha": 0.01}}]."""
    steps = []
    for item in config:
        name, options = (item, {}) if isinstance(item, str) else next(iter(item.items()))
        steps.append(STEPS.get(name).fn(**(options or {})))
    return steps
