"""What every reward source returns, and the call accounting each one keeps."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

Prompt = str | list[dict]


class RewardError(RuntimeError):
    """A reward source failed under the `raise` policy; the message names the sample."""


def _mask(failed: Tensor | None, n: int) -> Tensor:
    """`failed` as a bool tensor on the CPU; all False for a source that cannot fail."""
    return failed.cpu() if failed is not None else torch.zeros(n, dtype=torch.bool)


@dataclass
class Scores:
    """One score per completion; `uncertainty` where the source can tell, `failed` marks failures."""

    values: Tensor
    uncertainty: Tensor | None = None
    failed: Tensor | None = None

    def failure_mask(self) -> Tensor:
        return _mask(self.failed, len(self.values))


@dataclass
class CallStats:
    """Calls, scored items, failures, timeouts and time spent, exposed as metrics."""

    calls: int = 0
    items: int = 0
    failures: int = 0
    timeouts: int = 0
    seconds: float = 0.0
    prompt_tokens: int = 0      # tokens sent to and received from generative backends
    completion_tokens: int = 0
    examples: list[str] = field(default_factory=list)  # the first few failure messages

    @contextmanager
    def timed(self, items: int) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.calls += 1
            self.items += items
            self.seconds += time.perf_counter() - started

    def failure(self, message: str, timeout: bool = False, samples: int = 1) -> None:
        """`samples` items failed for one reason (a whole batch, when the call itself failed)."""
        self.failures += samples
        self.timeouts += int(timeout)
        if len(self.examples) < 5:
            self.examples.append(message)

    def metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/calls": self.calls, f"{prefix}/items": self.items,
                f"{prefix}/failures": self.failures, f"{prefix}/timeouts": self.timeouts,
                f"{prefix}/seconds_per_call": self.seconds / max(self.calls, 1),
                f"{prefix}/prompt_tokens": self.prompt_tokens, f"{prefix}/completion_tokens": self.completion_tokens}


@dataclass
class Preference:
    """P(a better than b) per pair; `uncertainty` where the judge can tell, `failed` marks failures.

    A failed pair (judge error, unparsable verdict under the abstain policy) has probability 0.5.
    """

    probs: Tensor
    uncertainty: Tensor | None = None
    failed: Tensor | None = None

    def failure_mask(self) -> Tensor:
        return _mask(self.failed, len(self.probs))

    @property
    def logits(self) -> Tensor:
        return torch.logit(self.probs.double().clamp(1e-12, 1 - 1e-12)).float()


class RewardSource(Protocol):
    """Anything that scores (prompt, completion) pairs in batches.

    A source with `reads_tokens = True` also takes `tokens=[(prompt ids, completion ids), ...]`: the
    online trainer then passes the generated token ids, to be scored as generated.
    """

    stats: CallStats

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str],
              references: Sequence[str | None] | None = None) -> Scores: ...


class PairwiseJudge(Protocol):
    """Anything that compares two completions of one prompt, in batches."""

    stats: CallStats

    def compare(self, prompts: Sequence[Prompt], a: Sequence[str], b: Sequence[str]) -> Preference: ...


class RewardComparison:
    shardable = ("source",)
    """Any reward source as a pairwise judge: P(a > b) = sigma(r_a - r_b) (Bradley-Terry).

    Uncertainty, where the source reports one per score, is sqrt(u_a^2 + u_b^2), the spread of
    the difference for independent errors.
    """

    def __init__(self, source: RewardSource):
        self.source, self.stats = source, source.stats

    def compare(self, prompts, a, b) -> Preference:
        scores = self.source.score(list(prompts) * 2, list(a) + list(b))
        n = len(prompts)
        values, uncertainty, failed = scores.values, scores.uncertainty, scores.failed
        probs = torch.sigmoid(values[:n] - values[n:]).float()
        if uncertainty is not None:
            uncertainty = (uncertainty[:n] ** 2 + uncertainty[n:] ** 2).sqrt()
        if failed is not None:
            failed = failed[:n] | failed[n:]
            probs = torch.where(failed, torch.full_like(probs, 0.5), probs)
        return Preference(probs, uncertainty, failed)
