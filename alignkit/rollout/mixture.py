"""Nash-MD's alternative policy: the token-level geometric mixture of the policy and the reference.

pi_mix(y_t | .) is proportional to pi(y_t | .)^(1 - alpha) pi_ref(y_t | .)^alpha (Munos et al.,
arXiv 2312.00886), i.e. softmax((1 - alpha) logits + alpha logits_ref). `GeometricMixture` looks to
the rollout engine like one causal LM: each forward runs both models, each with its own KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class _PairedCache:
    """The two models' caches, pruned together when rows finish."""

    def __init__(self, policy, reference):
        self.policy, self.reference = policy, reference

    def batch_select_indices(self, index) -> None:
        self.policy.batch_select_indices(index)
        self.reference.batch_select_indices(index)


@dataclass
class _Output:
    logits: torch.Tensor
    past_key_values: _PairedCache | None


class GeometricMixture(nn.Module):
    def __init__(self, policy: nn.Module, reference: nn.Module, alpha: float):
        super().__init__()
        if not 0 <= alpha <= 1:
            raise ValueError(f"the mixture coefficient must be in [0, 1], got {alpha}")
        self.policy, self.reference, self.alpha = policy, reference, alpha
        self.config, self.generation_config = policy.config, getattr(policy, "generation_config", None)

    def train(self, mode: bool = True):
        """Only the flag: the policy's mode is its trainer's business, the reference stays in eval mode."""
        self.training = mode
        return self

    def forward(self, *, past_key_values=None, use_cache=False, **inputs):
        caches = (past_key_values.policy, past_key_values.reference) if past_key_values is not None else (None, None)
        mine = self.policy(**inputs, past_key_values=caches[0], use_cache=use_cache)
        theirs = self.reference(**inputs, past_key_values=caches[1], use_cache=use_cache)
        logits = (1 - self.alpha) * mine.logits.float() + self.alpha * theirs.logits.float()
        cache = _PairedCache(mine.past_key_values, theirs.past_key_values) if use_cache else None
        return _Output(logits, cache)
