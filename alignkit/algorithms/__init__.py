"""Losses as pure tensor functions, each registered by name."""

from alignkit.algorithms.advantages import ADVANTAGES
from alignkit.algorithms.pairwise import PAIRWISE_LOSSES, pairwise_loss
from alignkit.algorithms.preference import (
    PREFERENCE_LOSSES,
    needs_reference,
    normalize_config,
    preference_loss,
    r3m_delta,
)
from alignkit.algorithms.reward import REWARD_LOSSES, reward_loss
from alignkit.algorithms.sft import sft_loss
from alignkit.algorithms.unpaired import UNPAIRED_LOSSES, kto_reference_point, unpaired_loss

__all__ = [
    "ADVANTAGES",
    "PAIRWISE_LOSSES",
    "PREFERENCE_LOSSES",
    "REWARD_LOSSES",
    "UNPAIRED_LOSSES",
    "kto_reference_point",
    "needs_reference",
    "normalize_config",
    "pairwise_loss",
    "preference_loss",
    "r3m_delta",
    "reward_loss",
    "sft_loss",
    "unpaired_loss",
]
