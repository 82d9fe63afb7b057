"""Supervised fine-tuning: negative log-likelihood of the completion tokens."""

from __future__ import annotations

from torch import Tensor


def sft_loss(token_logps: Tensor, mask: Tensor) -> Tensor:
    """Summed NLL over completion tokens [scalar]; the trainer divides by the step's token count.

    Dividing by the token count of the whole optimizer step, not of each micro-batch, is what
    makes gradient accumulation give the full-batch gradient.
    """
    return -(token_logps * mask).sum()
