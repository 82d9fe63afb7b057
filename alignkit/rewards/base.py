"""What every reward source returns, and the call accounting each one keeps."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor

Prompt = str | list[dict]


class RewardError(RuntimeError):
    """A reward source failed under the `raise` policy; the message names the sample."""


@dataclass
class Scores:
    """One score per completion; `uncertainty` where the source can tell, `failed` marks failures."""

    values: Tensor
    uncertainty: Tensor | None = None
    failed: Tensor | None = None


@dataclass
class CallStats:
    """Calls, scored items, failures, timeouts and time spent, exposed as metrics."""

    calls: int = 0
    items: int = 0
    failures: int = 0
    timeouts: int = 0
    seconds: float = 0.0
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

    def failure(self, message: str, timeout: bool = False) -> None:
        self.failures += 1
        self.timeouts += int(timeout)
        if len(self.examples) < 5:
            self.examples.append(message)

    def metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/calls": self.calls, f"{prefix}/items": self.items,
                f"{prefix}/failures": self.failures, f"{prefix}/timeouts": self.timeouts,
                f"{prefix}/seconds_per_call": self.seconds / max(self.calls, 1)}


class RewardSource(Protocol):
    """Anything that scores (prompt, completion) pairs in batches."""

    stats: CallStats

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str],
              references: Sequence[str | None] | None = None) -> Scores: ...
