"""What every rollout engine takes and returns.

Prompts go in as token ids (the trainer owns the chat template, so every engine sees exactly the
tokens the policy is trained on). Each completion carries its token ids, text, the log-prob of every
sampled token and why it stopped. Sampling log-probs are those of softmax(logits / temperature),
before top-k / top-p truncation: the distribution the trainer recomputes for importance ratios.

Seeds: `generate` takes one seed per prompt, or an int from which each prompt's seed is derived by
`prompt_seeds` (from the int and the prompt's position). A prompt's random draws come from its own
seed alone, so with per-prompt seeds its completion does not depend on the other prompts of the call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Protocol

import numpy as np

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

    def generate(self, prompts: Sequence[list[int]], sampling: SamplingConfig,
                 seed: int | Sequence[int]) -> list[Completion]:
        """One completion per prompt, reproducible for given seeds on one machine.

        seed: an int or one per prompt (see `prompt_seeds`)."""
        ...

    def sync_weights(self, model) -> None:
        """Make the engine sample from `model`'s current weights (after an optimizer step)."""
        ...


def row_seed(seed: int, row: int) -> int:
    """The seed of the prompt at position `row` of a call with int seed `seed`: the first 32-bit word of
    numpy's SeedSequence([seed mod 2**64, row]), distinct per (seed, row) and stable across machines."""
    return int(np.random.SeedSequence([seed % 2**64, row]).generate_state(1)[0])


def prompt_seeds(seed: int | Sequence[int], count: int) -> list[int]:
    """One seed per prompt: `seed` itself when it is a sequence (of `count` ints), else derived by `row_seed`."""
    if isinstance(seed, Integral):
        return [row_seed(int(seed), row) for row in range(count)]
    seeds = [int(s) for s in seed]
    if len(seeds) != count:
        raise ValueError(f"got {len(seeds)} seeds for {count} prompts: give one seed per prompt, or an int")
    return seeds
