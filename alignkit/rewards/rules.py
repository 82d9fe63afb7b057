"""Rule and verifier rewards: plain Python functions (prompt, completion, reference) -> float, or
batch functions as Hugging Face TRL users write them (`BatchRuleReward`).

Each sample is scored on its own, so one bad sample never loses the others. Policies:
- an exception, a non-numeric or non-finite return, or a call past `timeout_s` is a failure;
- `on_error="score"` (default) gives a failure `failure_score` and counts it (with the first
  messages kept in `stats.examples`); `on_error="raise"` stops with a RewardError naming the sample.
A call past its timeout is abandoned: it keeps running in a daemon thread until it returns (Python
cannot stop a thread), but the run no longer waits for it and the process can still exit.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from alignkit.rewards.base import CallStats, Prompt, RewardError, Scores

RuleFn = Callable[[Prompt, str, str | None], float]
ON_ERROR = ("score", "raise")


def load_rule(spec: str) -> RuleFn:
    """Load `path/to/file.py:function` (as given on the command line)."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise ValueError(f"reward function {spec!r} must look like path/to/file.py:function_name")
    if not Path(path).is_file():
        raise FileNotFoundError(f"reward function file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(f"alignkit_rule_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        raise ValueError(f"could not import {path}: {type(err).__name__}: {err}") from err
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"{path} has no function {name!r}")
    return fn


def _call_with_timeout(fn: RuleFn, args: tuple, timeout_s: float) -> tuple[object, BaseException | None, bool]:
    """(result, exception, timed_out) of fn(*args), waiting at most timeout_s."""
    box: dict = {}

    def run():
        try:
            box["result"] = fn(*args)
        except BaseException as err:  # noqa: BLE001 - reported per sample, never swallowed silently
            box["error"] = err

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        return None, None, True
    return box.get("result"), box.get("error"), False


class RuleReward:
    def __init__(self, fn: RuleFn | str, *, timeout_s: float = 10.0, on_error: str = "score",
                 failure_score: float = 0.0):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.fn = load_rule(fn) if isinstance(fn, str) else fn
        self.timeout_s, self.on_error, self.failure_score = timeout_s, on_error, failure_score
        self.stats = CallStats()

    def _one(self, index: int, prompt: Prompt, completion: str, reference: str | None) -> float | None:
        result, error, timed_out = _call_with_timeout(self.fn, (prompt, completion, reference), self.timeout_s)
        if timed_out:
            problem = f"sample {index}: timed out after {self.timeout_s:g}s"
        elif error is not None:
            problem = f"sample {index}: {type(error).__name__}: {error}"
        elif isinstance(result, bool) or not isinstance(result, int | float) or not math.isfinite(result):
            problem = f"sample {index}: returned {result!r}, not a finite number"
        else:
            return float(result)
        if self.on_error == "raise":
            raise RewardError(f"reward function {getattr(self.fn, '__name__', self.fn)} failed on {problem}")
        self.stats.failure(problem, timeout=timed_out)
        return None

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str],
              references: Sequence[str | None] | None = None) -> Scores:
        references = references if references is not None else [None] * len(prompts)
        with self.stats.timed(len(prompts)):
            results = [self._one(i, p, c, r) for i, (p, c, r) in
                       enumerate(zip(prompts, completions, references, strict=True))]
        failed = torch.tensor([r is None for r in results])
        values = torch.tensor([self.failure_score if r is None else r for r in results], dtype=torch.float32)
        return Scores(values, failed=failed)


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

    def __init__(self, fn: Callable | str, *, timeout_s: float = 60.0, **options):
        super().__init__(fn, timeout_s=timeout_s, **options)
        self.unscored = 0

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str], references=None, *,
              tokens: Sequence[tuple[list[int], list[int]]] | None = None,
              columns: Sequence[dict] | None = None) -> Scores:
        arguments = {"prompts": list(prompts), "completions": [_as_completion(p, c) for p, c in
                                                                 zip(prompts, completions, strict=True)],
                     "completion_ids": [list(c) for _, c in tokens] if tokens is not None else None,
                     **_by_name(columns or [{} for _ in prompts], references)}
        with self.stats.timed(len(prompts)):
            results = self._call(arguments, len(prompts))
        failed = torch.tensor([r is None for r in results])
        values = torch.tensor([self.failure_score if r is None else r for r in results], dtype=torch.float32)
        return Scores(values, failed=failed)

    def _call(self, arguments: dict, n: int) -> list[float | None]:
        result, error, timed_out = _call_with_timeout(lambda: self.fn(**arguments), (), self.timeout_s)
        name = getattr(self.fn, "__name__", self.fn)
        if timed_out:
            problem = f"batch of {n}: timed out after {self.timeout_s:g}s"
        elif error is not None:
            problem = f"batch of {n}: {type(error).__name__}: {error}"
        elif not isinstance(result, list | tuple) or len(result) != n:
            problem = f"batch of {n}: returned {result!r:.80}, not a list of {n} scores"
        else:
            return [self._value(i, value) for i, value in enumerate(result)]
        if self.on_error == "raise":
            raise RewardError(f"reward function {name} failed on a {problem}")
        self.stats.failure(problem, timeout=timed_out, samples=n)   # every sample of the batch failed
        return [None] * n

    def _value(self, index: int, value) -> float | None:
        if value is None:
            self.unscored += 1
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            problem = f"sample {index}: returned {value!r}, not a finite number"
            if self.on_error == "raise":
                raise RewardError(f"reward function {getattr(self.fn, '__name__', self.fn)} failed on {problem}")
            self.stats.failure(problem)
            return None
        return float(value)


def _as_completion(prompt: Prompt, text: str):
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def _by_name(columns: Sequence[dict], references) -> dict[str, list]:
    """One list per column name present in every record; `reference` too, under that name, when given."""
    names = set.intersection(*(set(c) for c in columns)) if columns else set()
    out = {name: [c[name] for c in columns] for name in sorted(names)}
    if references is not None and any(r is not None for r in references):
        out.setdefault("reference", list(references))
    return out
