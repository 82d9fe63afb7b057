"""Rule and verifier rewards: plain Python functions (prompt, completion, reference) -> float, or
batch functions as Hugging Face TRL users write them (`BatchRuleReward`).

Each sample is scored on its own, so one bad sample never loses the others. Policies:
- an exception, a non-numeric or non-finite return, or a call unfinished `timeout_s` after the batch
  started (one deadline per batch) is a failure;
- `on_error="score"` (default) gives a failure `failure_score` and counts it (with the first
  messages kept in `stats.examples`); `on_error="raise"` stops with a RewardError naming the sample.
Where the calls run is `isolation` (alignkit/isolation.py): threads of this process ("none": a hang
is interrupted at its next Python bytecode, a crash kills training) or worker processes ("process":
killed and replaced on a timeout or a crash).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import torch

from alignkit.isolation import ISOLATION, Outcome, load_rule
from alignkit.rewards.base import CallStats, Prompt, RewardError, Scores

RuleFn = Callable[[Prompt, str, str | None], float]
ON_ERROR = ("score", "raise")
__all__ = ["BatchRuleReward", "RuleReward", "exact_match", "is_batch_function", "load_rule"]


def _is_score(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


class RuleReward:
    def __init__(self, fn: RuleFn | str, *, timeout_s: float = 60.0, on_error: str = "score",
                 failure_score: float = 0.0, isolation: str = "none", workers: int = 4,
                 memory_mb: int | None = None):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if not _is_score(timeout_s) or timeout_s <= 0:
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a whole number >= 1, got {workers!r}")
        self.fn = load_rule(fn) if isinstance(fn, str) else fn
        self.timeout_s, self.on_error, self.failure_score = timeout_s, on_error, failure_score
        self.runner = ISOLATION.call(isolation, self.fn, workers=workers, memory_mb=memory_mb)
        self.stats = CallStats()

    def close(self) -> None:
        """Stop the worker processes (isolation=process); they are also stopped at interpreter exit."""
        self.runner.close()

    def _fail(self, problem: str, *, timeout: bool = False, samples: int = 1) -> None:
        if self.on_error == "raise":
            raise RewardError(f"reward function {getattr(self.fn, '__name__', self.fn)} failed on {problem}")
        self.stats.failure(problem, timeout=timeout, samples=samples)

    def _one(self, index: int, outcome: Outcome) -> float | None:
        if outcome.error is None and _is_score(outcome.value):
            return float(outcome.value)
        problem = outcome.error or f"returned {outcome.value!r}, not a finite number"
        self._fail(f"sample {index}: {problem}", timeout=outcome.timed_out)
        return None

    def _scores(self, results: list[float | None]) -> Scores:
        failed = torch.tensor([r is None for r in results])
        values = torch.tensor([self.failure_score if r is None else r for r in results], dtype=torch.float32)
        return Scores(values, failed=failed)

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str],
              references: Sequence[str | None] | None = None) -> Scores:
        references = references if references is not None else [None] * len(prompts)
        calls = [((p, c, r), {}) for p, c, r in zip(prompts, completions, references, strict=True)]
        with self.stats.timed(len(prompts)):
            outcomes = self.runner.run(calls, self.timeout_s)
            return self._scores([self._one(i, outcome) for i, outcome in enumerate(outcomes)])


def exact_match(prompt: Prompt, completion: str, reference: str | None) -> float:
    """1 when the completion equals the reference (surrounding spaces ignored), else 0."""
    if reference is None:
        raise ValueError("exact_match needs a reference answer")
    return float(completion.strip() == reference.strip())


def is_batch_function(fn) -> bool:
    """TRL's signature, `fn(prompts, completions, completion_ids, **columns)`: it names `completions`."""
    try:
        return "completions" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class BatchRuleReward(RuleReward):
    """A reward function with TRL's signature, loaded unchanged: `fn(prompts=..., completions=...,
    completion_ids=..., **columns) -> list[float | None]`, called once per batch with keywords.

    Conversational prompts (message lists) get completions as `[{"role": "assistant", "content": ...}]`,
    as TRL passes them; `columns` are the prompt records' other fields (e.g. `solution`), one list per name.
    A `None` score means "no score for this sample": it is counted as unscored and marked failed (the
    failure score is used). One deadline covers the whole batch; a batch that raises, times out or
    returns the wrong number of scores fails every sample in it (`on_error="raise"` stops instead).
    """

    reads_tokens = True
    reads_columns = True

    def __init__(self, fn: Callable | str, **options):
        super().__init__(fn, **options)
        self.unscored = 0

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str], references=None, *,
              tokens: Sequence[tuple[list[int], list[int]]] | None = None,
              columns: Sequence[dict] | None = None) -> Scores:
        arguments = {"prompts": list(prompts), "completions": [_as_completion(p, c) for p, c in
                                                                 zip(prompts, completions, strict=True)],
                     "completion_ids": [list(c) for _, c in tokens] if tokens is not None else None,
                     **_by_name(columns or [{} for _ in prompts], references)}
        with self.stats.timed(len(prompts)):
            (outcome,) = self.runner.run([((), arguments)], self.timeout_s)
            return self._scores(self._split(outcome, len(prompts)))

    def _split(self, outcome: Outcome, n: int) -> list[float | None]:
        """One score per sample, or every sample failed when the call itself did."""
        value = outcome.value
        if outcome.error is None and isinstance(value, list | tuple) and len(value) == n:
            return [self._value(i, v) for i, v in enumerate(value)]
        problem = outcome.error or f"returned {value!r:.80}, not a list of {n} scores"
        self._fail(f"a batch of {n}: {problem}", timeout=outcome.timed_out, samples=n)
        return [None] * n

    def _value(self, index: int, value) -> float | None:
        if value is None:
            self.unscored += 1
            return None
        return self._one(index, Outcome(value))


def _as_completion(prompt: Prompt, text: str):
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def _by_name(columns: Sequence[dict], references) -> dict[str, list]:
    """One list per column name present in every record; `reference` too, under that name, when given."""
    names = set.intersection(*(set(c) for c in columns)) if columns else set()
    out = {name: [c[name] for c in columns] for name in sorted(names)}
    if references is not None and any(r is not None for r in references):
        out.setdefault("reference", list(references))
    return out
