"""Reward-model losses on paired data (algorithms.md sections 4 and 10.1).

`chosen_rewards` and `rejected_rewards` are the model's scalar scores [batch], or [batch, K] for
a model with K reward heads; each loss returns per-example losses [batch].
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from alignkit.algorithms.preference import _check_lam, normalize_config, r3m_delta
from alignkit.registry import Registry

REWARD_LOSSES = Registry("reward loss")
register = REWARD_LOSSES.register


def reward_loss(name: str, *, chosen_rewards: Tensor, rejected_rewards: Tensor,
                margins: Tensor | None = None, **config) -> Tensor:
    """Per-example loss [batch] of the registered reward loss `name`.

    With K heads ([batch, K] rewards) the loss is applied to each head and averaged over heads; a
    margin [batch] is shared by the heads, R3M's `delta` is per head ([batch, K], or computed so).
    """
    heads = chosen_rewards.dim() == 2
    if heads and margins is not None:
        margins = margins[:, None]
    losses = REWARD_LOSSES.call(name, chosen_rewards, rejected_rewards, margins, **normalize_config(config))
    return losses.mean(1) if heads else losses


@register("bradley_terry", summary="-log sigma(r_w - r_l - m), optional margin m and centring",
          paper="Bradley & Terry 1952; margin: Touvron et al. 2023; centring: Eisenstein et al. 2023")
def bradley_terry(r_w: Tensor, r_l: Tensor, margins: Tensor | None, *, centering: float = 0.0) -> Tensor:
    """`margins` (the data's preference strength) is subtracted when given; `centering` adds
    c * (r_w + r_l)^2, which pins the otherwise free offset of the rewards near zero."""
    diff = r_w - r_l - (margins if margins is not None else 0.0)
    return -F.logsigmoid(diff) + centering * (r_w + r_l) ** 2


@register("r3m", summary="Bradley-Terry robust to corrupted labels: per-pair outlier delta, l1 penalty",
          paper="Bukharin et al. 2024, arXiv 2406.15568")
def r3m(r_w: Tensor, r_l: Tensor, margins: Tensor | None, *, lam: float = 0.75,
        delta: Tensor | None = None) -> Tensor:
    """Alternating R3M step: closed-form delta with the model fixed (or given), then BT with delta fixed.

    Record margins are not used: the paper's model has no margin term (delta plays that part).
    """
    _check_lam(lam)
    if delta is None:
        delta = r3m_delta(r_w - r_l, beta=1.0, lam=lam)
    return -F.logsigmoid(r_w - r_l + delta) + lam * delta.abs()
