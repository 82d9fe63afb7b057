"""Pairwise preference-model losses (algorithms.md section 2.2).

A pairwise preference model reads the prompt and both answers as one sequence and outputs one
logit g = logit P(first answer better). `labels` are P(first better) in {0, 1/2, 1}; each loss
returns per-sequence losses.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from alignkit.algorithms.preference import normalize_config
from alignkit.registry import Registry

PAIRWISE_LOSSES = Registry("pairwise loss")
register = PAIRWISE_LOSSES.register


def pairwise_loss(name: str, *, logits: Tensor, labels: Tensor, margins: Tensor | None = None, **config) -> Tensor:
    """Per-sequence loss [batch] of the registered pairwise loss `name`."""
    return PAIRWISE_LOSSES.call(name, logits, labels, margins, **normalize_config(config))


@register("bce", summary="weighted BCE -w[l log s(g) + (1-l) log s(-g)], l in {0, 1/2, 1}; scaled: w = |margin|",
          paper="Xu et al. 2025, arXiv 2510.20369")
def weighted_bce(g: Tensor, labels: Tensor, margins: Tensor | None, *, scaled: bool = False) -> Tensor:
    """Weight w = 1, or the preference strength |margin| of each comparison with `scaled` (the
    paper's scaled-BT variant); a comparison with margin 0 then carries no weight."""
    if scaled and margins is None:
        raise ValueError("loss.scaled=true weights each comparison by |margin|: every comparison needs a margin "
                         "(or score_chosen and score_rejected)")
    weight = margins.abs() if scaled else 1.0
    return -weight * (labels * F.logsigmoid(g) + (1 - labels) * F.logsigmoid(-g))
