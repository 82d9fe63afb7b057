"""Policy-gradient losses for online RL (algorithms.md sections 9.1-9.5), as per-token tensors.

Every term is computed per token and reduced by a registered aggregation that divides by constants
of the whole mini-batch (`Totals`). The loss of a micro-batch is then its exact share of the
mini-batch loss: summing micro-batch losses, or accumulating their gradients, gives the same value
and gradient however the mini-batch is split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from alignkit.registry import Registry

AGGREGATIONS = Registry("loss aggregation")
KL_ESTIMATORS = Registry("KL estimator")
IMPORTANCE_RATIOS = Registry("importance ratio")


@dataclass(frozen=True)
class Totals:
    """Mini-batch constants the aggregations divide by."""

    tokens: int       # valid completion tokens
    sequences: int    # completions
    max_length: int   # L_max of seq-mean-token-sum-norm: the configured maximum completion length

    @classmethod
    def of(cls, mask: Tensor, max_length: int) -> Totals:
        return cls(int(mask.sum()), int((mask.sum(1) > 0).sum()), max_length)


@AGGREGATIONS.register("token-mean", summary="mean over every valid token of the mini-batch (DAPO)",
                       paper="Yu et al. 2025, arXiv 2503.14476")
def token_mean(values: Tensor, mask: Tensor, totals: Totals) -> Tensor:
    return (values * mask).sum() / max(totals.tokens, 1)


@AGGREGATIONS.register("seq-mean-token-mean", summary="mean over each completion's tokens, then over completions "
                       "(GRPO)", paper="Shao et al. 2024, arXiv 2402.03300")
def seq_mean_token_mean(values: Tensor, mask: Tensor, totals: Totals) -> Tensor:
    per_sequence = (values * mask).sum(1) / mask.sum(1).clamp(min=1)
    return per_sequence.sum() / max(totals.sequences, 1)


@AGGREGATIONS.register("seq-mean-token-sum-norm", summary="token sum / (completions x L_max) (Dr. GRPO)",
                       paper="Liu et al. 2025, arXiv 2503.20783")
def seq_mean_token_sum_norm(values: Tensor, mask: Tensor, totals: Totals) -> Tensor:
    return (values * mask).sum() / max(totals.sequences * totals.max_length, 1)


# KL estimators of KL(pi_theta || pi_ref) on sampled tokens, u = log pi_ref - log pi_theta (Schulman 2020).
@KL_ESTIMATORS.register("k1", summary="log pi - log pi_ref")
def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return logprobs - ref_logprobs


@KL_ESTIMATORS.register("k2", summary="(log pi - log pi_ref)^2 / 2")
def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return 0.5 * (ref_logprobs - logprobs) ** 2


@KL_ESTIMATORS.register("k3", summary="e^u - u - 1 (low variance; u clamped to +-20, value to 10 as in verl)")
def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    u = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
    return (u.exp() - u - 1).clamp(max=10.0)


@IMPORTANCE_RATIOS.register("token", summary="pi(y_t) / pi_old(y_t) per token (PPO)")
def token_log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    return (logprobs - old_logprobs) * mask


@IMPORTANCE_RATIOS.register("sequence", summary="(pi(y) / pi_old(y))^(1/|y|) for every token (GSPO)",
                            paper="Zheng et al. 2025, arXiv 2507.18071", aggregations=("seq-mean-token-mean",))
def sequence_log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """GSPO-token form: s_i,t = sg[s_i] * pi(y_t) / sg[pi(y_t)].

    Its value is the length-normalised sequence ratio s_i at every token; with a constant advantage per
    completion and seq-mean-token-mean aggregation its gradient is exactly GSPO's. Any other
    aggregation re-weights completions by length and drops GSPO's 1/|y|, so the trainer refuses it
    (the `aggregations` this ratio declares).
    """
    per_sequence = ((logprobs - old_logprobs) * mask).sum(1) / mask.sum(1).clamp(min=1)
    return (per_sequence.detach()[:, None] + logprobs - logprobs.detach()) * mask


@dataclass
class SurrogateTerms:
    loss: Tensor          # [n, T] per-token loss, 0 outside the mask
    ratio: Tensor         # [n, T] importance ratio (detached)
    clipped: Tensor       # [n, T] bool: the clipped branch was taken
    dual_clipped: Tensor  # [n, T] bool: the dual-clip bound was taken


def clipped_surrogate(log_ratio: Tensor, advantages: Tensor, mask: Tensor, *, clip_low: float = 0.2,
                      clip_high: float = 0.2, dual_clip: float | None = None) -> SurrogateTerms:
    """-min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A) per token (PPO, Schulman et al. 2017).

    clip_high > clip_low is DAPO's clip-higher (arXiv 2503.14476). `dual_clip` = c > 1 also bounds the
    loss of negative-advantage tokens by -c A (Ye et al. 2020, arXiv 1912.09729).
    """
    ratio = log_ratio.clamp(-20.0, 20.0).exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    dual = torch.zeros_like(mask, dtype=torch.bool)
    if dual_clip is not None:
        bound = -advantages * dual_clip
        dual = (advantages < 0) & (loss > bound) & mask.bool()
        loss = torch.where(advantages < 0, torch.minimum(loss, bound), loss)
    took_clip = (clipped > unclipped) & mask.bool()
    return SurrogateTerms(loss * mask, ratio.detach(), took_clip, dual)


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, *, clip: float | None = 0.2) -> Tensor:
    """1/2 max((V - R)^2, (V_old + clip(V - V_old, +-clip) - R)^2) per token; plain 1/2 (V - R)^2 without clip."""
    loss = (values - returns) ** 2
    if clip is not None:
        bounded = old_values + (values - old_values).clamp(-clip, clip)
        loss = torch.maximum(loss, (bounded - returns) ** 2)
    return 0.5 * loss


def overlong_penalty(lengths: Tensor, max_length: int, buffer: int) -> Tensor:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13): 0 up to max_length - buffer,
    then falling linearly to -1 at max_length."""
    return ((max_length - buffer - lengths.float()) / buffer).clamp(-1.0, 0.0)
