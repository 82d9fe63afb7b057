"""Losses as pure tensor functions, each registered by name."""

from alignkit.algorithms.preference import (
    PREFERENCE_LOSSES,
    needs_reference,
    normalize_config,
    preference_loss,
    r3m_delta,
)
from alignkit.algorithms.sft import sft_loss
from alignkit.algorithms.unpaired import UNPAIRED_LOSSES, kto_reference_point, unpaired_loss

__all__ = [
    "PREFERENCE_LOSSES",
    "UNPAIRED_LOSSES",
    "kto_reference_point",
    "needs_reference",
    "normalize_config",
    "preference_loss",
    "r3m_delta",
    "sft_loss",
    "unpaired_loss",
]
