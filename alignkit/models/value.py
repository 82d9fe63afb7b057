"""Critics for PPO: a value head on the policy's own trunk, or a separate value model.

Values are per completion token, read from the hidden state that predicts the token (the state the
token is chosen in), exactly where `policy_outputs` reads log-probs.
"""

from __future__ import annotations

import copy

from torch import Tensor, nn

from alignkit.models.logprobs import _base_and_head, _scatter


def value_head(hidden_size: int, seed: int = 0) -> nn.Linear:
    """A zero-initialised scalar head: every value starts at 0, so the first advantages are the returns."""
    head = nn.Linear(hidden_size, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


class ValueModel(nn.Module):
    """A separate critic: a copy of the policy's trunk with a scalar head (InstructGPT-style PPO)."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        parts = _base_and_head(policy)
        if parts is None:
            raise ValueError("a value model needs a causal LM with a plain linear head on a trunk")
        self.trunk = copy.deepcopy(parts[0])
        self.head = value_head(policy.config.hidden_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, score_mask: Tensor) -> Tensor:
        scored = score_mask[:, 1:].bool()
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1][scored]
        return _scatter(self.head(hidden).squeeze(-1).float(), scored, input_ids.shape)

