"""What every rollout engine takes and returns.

Prompts go in as token ids (the trainer owns the chat template, so every engine sees exactly the
tokens the policy is trained on). Each completion carries its token ids, text, the log-prob of every
sampled token and why it stopped. Sampling log-probs are those of softmax(logits / temperature),
before top-k / top-p truncation: the distribution the trainer recomputes for importance ratios.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

FINISH_REASONS = ("eos", "stop", "length")


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0      # 0: greedy
    top_p: float = 1.0
    top_k: int = 0                # 0: no top-k
    stop: tuple[str, ...] = ()    # stop strings; the completion ends with the token that completes one


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]          # generated tokens, the EOS token included when it ended on EOS
    text: str                     # decoded without special tokens, cut after a stop string
    logprobs: list[float]         # one per token id: log softmax(logits / temperature)[token]
    finish_reason: str            # one of FINISH_REASONS

    def __len__(self) -> int:
        return len(self.token_ids)


class Generator(Protocol):
    """A rollout engine: batched sampling from the current policy."""

    def generate(self, prompts: Sequence[list[int]], sampling: SamplingConfig, seed: int) -> list[Completion]:
        """One completion per prompt, reproducible for a given seed on one machine."""
        ...

    def sync_weights(self, model) -> None:
        """Make the engine sample from `model`'s current weights (after an optimizer step)."""
        ...
