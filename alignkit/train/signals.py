"""From scores to per-token advantages: KL in the reward, the registry's estimators, whitening.

Advantages are computed on whole groups before any split, so group statistics never depend on the
micro-batch size; statistics over the whole batch (whitening) sum over every rank's share.
"""

from __future__ import annotations

import torch
from torch import Tensor

from alignkit import distributed
from alignkit.algorithms.advantages import estimate

TOKEN_ADVANTAGES = {  # estimator output kind -> (advantages [n, T], returns or None)
    "completion": lambda out, mask: (out.reshape(-1, 1) * mask, None),
    "token": lambda out, mask: (out * mask, None),
    "token_and_returns": lambda out, mask: (out[0] * mask, out[1] * mask),
}


def batch_sum(values: Tensor) -> Tensor:
    """The sum of `values` over every rank's share of the batch (a differentiable-free statistic)."""
    return distributed.all_reduce(values.sum())


def whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(values - mean) / std over the valid tokens of the whole batch, every rank's share included."""
    count = batch_sum(mask).clamp(min=1)
    mean = batch_sum(values * mask) / count
    std = (batch_sum((values - mean) ** 2 * mask) / count).sqrt()
    return (values - mean) / (std + eps) * mask


def last_token(mask: Tensor) -> Tensor:
    """One-hot [n, T] at each row's last completion token."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * mask).argmax(1)
    return torch.nn.functional.one_hot(last, mask.shape[1]).to(mask.dtype) * (mask.sum(1, keepdim=True) > 0)


def kl_reward(exp, kl_coef: float, kl_in: str) -> Tensor | None:
    """k1 per token, kl_coef * (log pi_old - log pi_ref), when the KL penalty goes into the reward."""
    if not (kl_coef and kl_in == "reward"):
        return None
    return kl_coef * (exp.old_logprobs - exp.ref_logprobs) * exp.mask


def advantages(exp, cfg, output: str, wanted: set, baseline=None) -> None:
    """Fill `exp.advantages` (and `exp.returns`) with estimator `cfg.advantage`, through the registry."""
    kl = kl_reward(exp, cfg.kl_coef, cfg.kl_in)
    g = cfg.group_size
    inputs = {"preferences": exp.preferences, "mask": exp.mask, "values": exp.old_values, "batch_sum": batch_sum}
    if exp.rewards is not None:
        rewards = exp.rewards.to(exp.mask.device)
        token_rewards = last_token(exp.mask) * rewards.reshape(-1, 1)
        if kl is not None:
            rewards = rewards - kl.sum(1).view(-1, g)
            token_rewards = token_rewards - kl
        inputs.update(rewards=rewards, token_rewards=token_rewards, lengths=exp.mask.sum(1).view(-1, g))
    if "baseline" in wanted:
        inputs["baseline"] = baseline(exp).to(exp.mask.device)
    out = estimate(cfg.advantage, inputs, **cfg.advantage_options)
    exp.advantages, exp.returns = TOKEN_ADVANTAGES[output](out, exp.mask)
    if cfg.normalize_advantages:
        exp.advantages = whiten(exp.advantages, exp.mask)
