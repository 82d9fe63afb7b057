"""Advantage estimators for online RL (algorithms.md section 9), registered by name.

Group estimators take outcome rewards shaped [n_prompts, G] (G completions per prompt) and return
one advantage per completion, same shape, to be broadcast over the completion's tokens. Whole
groups are always scored together, before any micro-batching, so group statistics never depend
on how a step is split. Pairwise estimators take a skew-symmetric preference matrix per prompt
[n_prompts, G, G] (d_ij > 0 when completion i is better than j). `gae` works on token rewards.
"""

from __future__ import annotations

import torch
from torch import Tensor

from alignkit.registry import Registry

ADVANTAGES = Registry("advantage estimator")

# What an estimator returns: one advantage per completion [n_prompts, G], per token [n, T], or per
# token with the value targets it implies ((advantages, returns), both [n, T]).
OUTPUTS = ("completion", "token", "token_and_returns")
OPTIONAL_INPUTS = ("batch_sum",)


def estimate(name: str, inputs: dict, **options):
    """Call estimator `name` with the inputs it declares (its `inputs` meta), picked from `inputs` by name.

    The online trainer computes only what the chosen estimator declares (preferences from a judge,
    a greedy baseline, values from a critic), then calls it here like any other. `batch_sum`, for
    estimators that whiten over the whole batch, sums a tensor over every rank's share of the batch
    (plain `torch.sum` in one process), so the statistics do not depend on the world size.
    """
    entry = ADVANTAGES.get(name)
    wanted = entry.meta["inputs"]
    missing = [key for key in wanted if inputs.get(key) is None and key not in OPTIONAL_INPUTS]
    if missing:
        raise ValueError(f"advantage estimator {name!r} needs {missing}, which this run does not provide")
    keyword_only = set(entry.defaults())
    positional = [inputs[key] for key in wanted if key not in keyword_only]
    keywords = {k: inputs[k] for k in wanted if k in keyword_only and inputs.get(k) is not None}
    return ADVANTAGES.call(name, *positional, **keywords, **options)


def _check_groups(rewards: Tensor, minimum: int = 1) -> None:
    if rewards.dim() != 2 or rewards.shape[1] < minimum:
        raise ValueError(f"rewards must be [n_prompts, G] with G >= {minimum}, got {tuple(rewards.shape)}")


@ADVANTAGES.register("grpo", summary="(r - group mean) / (group std + eps)", paper="Shao et al. 2024, arXiv 2402.03300",
                     inputs=("rewards",), output="completion")
def grpo(rewards: Tensor, *, eps: float = 1e-6, unbiased: bool = True) -> Tensor:
    """Group-normalised rewards; std over the group, unbiased by default as in the DeepSeekMath code."""
    _check_groups(rewards, 2 if unbiased else 1)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred / (rewards.std(dim=1, keepdim=True, unbiased=unbiased) + eps)


@ADVANTAGES.register("dr_grpo", summary="r - group mean (no std scaling)", paper="Liu et al. 2025, arXiv 2503.20783",
                     inputs=("rewards",), output="completion")
def dr_grpo(rewards: Tensor) -> Tensor:
    _check_groups(rewards)
    return rewards - rewards.mean(dim=1, keepdim=True)


@ADVANTAGES.register("rloo", summary="r_i - mean of the other G-1 rewards",
                     paper="Ahmadian et al. 2024, arXiv 2402.14740",
                     inputs=("rewards",), output="completion")
def rloo(rewards: Tensor) -> Tensor:
    _check_groups(rewards, 2)
    g = rewards.shape[1]
    others = (rewards.sum(dim=1, keepdim=True) - rewards) / (g - 1)
    return rewards - others


@ADVANTAGES.register("remax", summary="r - reward of the greedy completion", paper="Li et al. 2023, arXiv 2310.10505",
                     inputs=("rewards", "baseline"), output="completion")
def remax(rewards: Tensor, *, baseline: Tensor) -> Tensor:
    """`baseline` [n_prompts]: the reward of the policy's greedy completion for each prompt."""
    _check_groups(rewards)
    return rewards - baseline[:, None]


@ADVANTAGES.register("reinforce_pp_baseline", summary="r - group mean, then whitened over the whole batch",
                     paper="Hu et al. 2025, arXiv 2501.03262",
                     inputs=("rewards", "lengths", "batch_sum"), output="completion")
def reinforce_pp_baseline(rewards: Tensor, *, lengths: Tensor | None = None, eps: float = 1e-8,
                          batch_sum=None) -> Tensor:
    """Whitening is over every valid token of the batch: each completion counts `lengths` times."""
    total = batch_sum or torch.sum
    centred = dr_grpo(rewards)
    weights = torch.ones_like(centred) if lengths is None else lengths.to(centred.dtype)
    mean = total(centred * weights) / total(weights)
    var = total((centred - mean) ** 2 * weights) / total(weights)
    return (centred - mean) / (var.sqrt() + eps)


def _check_skew(d: Tensor) -> None:
    if d.dim() != 3 or d.shape[1] != d.shape[2] or d.shape[1] < 2:
        raise ValueError(f"preferences must be [n_prompts, G, G] with G >= 2, got {tuple(d.shape)}")
    if not torch.allclose(d, -d.transpose(1, 2), atol=1e-6):
        raise ValueError("preferences must be skew-symmetric: d_ji = -d_ij")


@ADVANTAGES.register("pairwise", summary="GRPO from pairwise differences: mean_j d_ij / pooled std",
                     paper="Hong et al. 2025 (Think-RM), arXiv 2505.16265",
                     inputs=("preferences",), output="completion")
def pairwise(preferences: Tensor, *, eps: float = 1e-6) -> Tensor:
    """A_i = ((1/G) sum_j d_ij) / sqrt(sum_{j,k} d_jk^2 / (2G(G-1)) + eps).

    With d_ij = r_i - r_j this is exactly GRPO's (r_i - mean r) / std_unbiased (squared, eps inside).
    """
    _check_skew(preferences)
    g = preferences.shape[1]
    spread = (preferences ** 2).sum(dim=(1, 2)) / (2 * g * (g - 1))
    return preferences.mean(dim=2) / (spread + eps).sqrt()[:, None]


@ADVANTAGES.register("pairwise_mean", summary="c / (G-1) * sum_j s_ij: RLOO from preference logits",
                     paper="Xu et al. 2025 (uncertainty router), arXiv 2510.20369",
                     inputs=("preferences",), output="completion")
def pairwise_mean(preferences: Tensor, *, scale: float = 1.0, clamp: float = 10.0) -> Tensor:
    """With s_ij = logit P(i > j) = r_i - r_j under Bradley-Terry this is RLOO's advantage.

    Clamped to [-clamp, clamp] as in the paper's code.
    """
    _check_skew(preferences)
    g = preferences.shape[1]
    return (scale * preferences.sum(dim=2) / (g - 1)).clamp(-clamp, clamp)


@ADVANTAGES.register("gae", summary="generalised advantage estimation with a value model",
                     paper="Schulman et al. 2016, arXiv 1506.02438",
                     inputs=("token_rewards", "values", "mask"), output="token_and_returns")
def gae(token_rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """(advantages, returns), both [n, T]; positions outside `mask` are 0. V after the last valid token is 0.

    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1};  R_t = A_t + V_t.
    Completions are right-padded: `mask` is 1 on a prefix of each row.
    """
    mask = mask.to(values.dtype)
    rewards, values = token_rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros(values.shape[0], dtype=values.dtype, device=values.device)
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


@ADVANTAGES.register("reinforce_pp", summary="discounted token returns, whitened over the whole batch",
                     paper="Hu et al. 2025, arXiv 2501.03262", inputs=("token_rewards", "mask", "batch_sum"),
                     output="token")
def reinforce_pp(token_rewards: Tensor, mask: Tensor, *, gamma: float = 1.0, eps: float = 1e-8,
                 batch_sum=None) -> Tensor:
    """G_t = sum_{s>=t} gamma^(s-t) r_s, then (G_t - mean) / std over every valid token of the batch. No critic."""
    mask = mask.to(token_rewards.dtype)
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros(token_rewards.shape[0], dtype=token_rewards.dtype, device=token_rewards.device)
    for t in reversed(range(token_rewards.shape[1])):
        running = (token_rewards[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    total = batch_sum or torch.sum
    count = total(mask)
    mean = total(returns * mask) / count
    var = total((returns - mean) ** 2 * mask) / count
    return (returns - mean) / (var.sqrt() + eps) * mask
