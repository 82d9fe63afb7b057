"""Losses on unpaired rating data (prompt, completion, thumbs up/down); algorithms.md section 8.

`logps`/`ref_logps` are summed response-token log-probs [batch]; `labels` is a bool tensor
(True = desirable). Each loss returns per-example losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.registry import Registry

UNPAIRED_LOSSES = Registry("unpaired loss")
register = UNPAIRED_LOSSES.register


def unpaired_loss(name: str, *, logps: Tensor, ref_logps: Tensor, labels: Tensor, **config) -> Tensor:
    """Per-example loss [batch] of the registered unpaired loss `name`."""
    return UNPAIRED_LOSSES.call(name, logps - ref_logps, labels.bool(), **config)


@torch.no_grad()
def kto_reference_point(mismatched_logps: Tensor, mismatched_ref_logps: Tensor) -> Tensor:
    """KTO's z0 = max(0, mean(log pi(y'|x) - log pi_ref(y'|x))) over mismatched pairs, stop-grad.

    Ethayarajh et al. 2024 (arXiv 2402.01306) estimate the KL term from completions y' paired
    with prompts x they do not answer; the trainer builds those pairs from the step's batch.
    """
    return (mismatched_logps - mismatched_ref_logps).mean().clamp(min=0)


@register("kto", summary="prospect-theoretic loss against a KL reference point z0",
          paper="Ethayarajh et al. 2024, arXiv 2402.01306")
def kto(h: Tensor, labels: Tensor, *, beta: float = 0.1, desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0, reference_point: float | Tensor = 0.0) -> Tensor:
    z0 = torch.as_tensor(reference_point, dtype=h.dtype)
    value = torch.where(labels, torch.sigmoid(beta * (h - z0)), torch.sigmoid(beta * (z0 - h)))
    weight = torch.where(labels, h.new_tensor(desirable_weight), h.new_tensor(undesirable_weight))
    return weight * (1 - value)


@register("bco", summary="binary classifier of reward beta*h against a running shift delta",
          paper="Jung et al. 2024, arXiv 2404.04656")
def bco(h: Tensor, labels: Tensor, *, beta: float = 0.1, delta: float | Tensor = 0.0) -> Tensor:
    shifted = beta * h - delta
    return -F.logsigmoid(torch.where(labels, shifted, -shifted))
