"""Reward transforms (algorithms.md section 10), composable on any reward source.

Pure functions on tensors, plus `Transformed(source, *steps)`, a reward source that applies steps
in order. A step is any callable (values, prompts, completions) -> values; the stateful running
normaliser keeps its state for checkpoints.

Reference steps (`ReferenceStep`: PAR, log-sigmoid centring) also take `reference_rewards` [n, M]:
the source's scores of M responses to each row's prompt sampled from the reference policy by the
`ReferenceSampler` bound to the `Transformed` (`alignkit rl` binds one on a frozen copy of the
initial policy or the configured reference). Those scores pass through the steps before the
reference step (read-only: the running normaliser does not learn from them), so both sides of
r - r_ref are on one scale. Samples and their scores are cached per prompt: the reference policy and
the source are fixed. Scoring them is counted in `Transformed.reference_stats`, never in `stats`, so
the run's call and failure counts are those of the policy's completions alone. A failed reference
sample is left out of its prompt's set; a row whose samples all failed is scored as a tie with the
reference (r_ref = r) and marked failed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.config import ConfigError
from alignkit.registry import Registry
from alignkit.rewards.base import CallStats, Prompt, RewardSource, Scores
from alignkit.rollout.base import SamplingConfig, row_seed

Step = Callable[[Tensor, Sequence[Prompt], Sequence[str]], Tensor]
STEPS = Registry("reward transform")  # the steps a config or command line can name


def par(rewards: Tensor, reference_rewards: Tensor) -> Tensor:
    """Preference As Reward: mean_m sigma(r - r_ref,m), bounded in (0, 1) and centred.

    Fu et al. 2025 (arXiv 2502.18770); `reference_rewards` [n, M] scores M reference responses
    (sampled from the SFT policy) for each row's prompt; NaN entries (failed samples) are left out.
    """
    return torch.sigmoid(rewards[:, None] - reference_rewards).nanmean(dim=1)


def log_sigmoid_centered(rewards: Tensor, reference: Tensor) -> Tensor:
    """log sigma(r - r_ref(x)), Wang et al. 2024 (arXiv 2402.00742); r_ref is per prompt [n]."""
    return F.logsigmoid(rewards - reference)


def reference_percentile(reference_rewards: Tensor, q: float = 0.85) -> Tensor:
    """The per-prompt reference reward r_ref(x) that paper suggests: a quantile of SFT samples' rewards.

    NaN entries (failed samples) are left out.
    """
    return torch.nanquantile(reference_rewards, q, dim=1)


@STEPS.register("running_norm", summary="(r - mean) / std over every reward seen so far")
class RunningNorm:
    """(r - mean) / std over every reward seen so far (Welford), for stable PPO rewards."""

    def __init__(self, eps: float = 1e-8):
        self.count, self.mean, self.m2, self.eps = 0, 0.0, 0.0, eps

    def update(self, values: Tensor) -> None:
        for x in values.double().tolist():
            self.count += 1
            delta = x - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (x - self.mean)

    @property
    def std(self) -> float:
        return (self.m2 / self.count) ** 0.5 if self.count > 1 else 1.0

    def __call__(self, values: Tensor, prompts=None, completions=None) -> Tensor:
        self.update(values)
        return self.apply(values)

    def apply(self, values: Tensor, prompts=None, completions=None) -> Tensor:
        """Normalise with the statistics so far, without learning from `values` (for reference rewards)."""
        return (values - self.mean) / (self.std + self.eps)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]


@STEPS.register("clip", summary="clamp rewards to [low, high]")
def clip(low: float, high: float) -> Step:
    return lambda values, prompts=None, completions=None: values.clamp(low, high)


@STEPS.register("length_penalty", summary="r - alpha * length (characters)")
def length_penalty(alpha: float, length: Callable[[str], int] = len) -> Step:
    """r - alpha * length(completion); characters by default, or pass a token counter."""
    def step(values, prompts, completions):
        lengths = torch.tensor([length(c) for c in completions], dtype=values.dtype)
        return values - alpha * lengths
    return step


def prompt_key(prompt: Prompt) -> str:
    """A prompt as text: itself, or its chat messages as canonical JSON."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


@dataclass(frozen=True)
class ReferenceDraw:
    """How many reference responses a step wants per prompt, and how they are sampled.

    max_new_tokens None: the sampler's (in `alignkit rl`, the rollout's); top-p, top-k and stop strings are
    always the sampler's.
    """

    m: int
    max_new_tokens: int | None = None
    temperature: float = 1.0

    def __post_init__(self):
        if self.m < 1 or self.temperature < 0:
            raise ValueError(f"a reference step needs m >= 1 and temperature >= 0, got {self}")


class ReferenceStep:
    """A step that also takes the rewards of reference responses: (values, prompts, completions, [n, M])."""

    name = "reference"
    draw: ReferenceDraw

    def __call__(self, values: Tensor, prompts, completions, reference_rewards: Tensor) -> Tensor:
        raise NotImplementedError


@STEPS.register("par", summary="mean_m sigma(r - r_ref,m) over m reference-policy samples",
                paper="Fu et al. 2025, arXiv 2502.18770")
class PreferenceAsReward(ReferenceStep):
    """PAR (arXiv 2502.18770): the mean sigmoid of the margin over m responses of the reference policy."""

    name = "par"

    def __init__(self, m: int = 4, max_new_tokens: int | None = None, temperature: float = 1.0):
        self.draw = ReferenceDraw(m, max_new_tokens, temperature)

    def __call__(self, values, prompts, completions, reference_rewards):
        return par(values, reference_rewards)


@STEPS.register("log_sigmoid", summary="log sigma(r - r_ref(x)), r_ref a quantile of reference-policy rewards",
                paper="Wang et al. 2024, arXiv 2402.00742")
class LogSigmoidCentered(ReferenceStep):
    """Log-sigmoid centring (arXiv 2402.00742): r_ref(x) is the `quantile` of m reference-policy rewards."""

    name = "log_sigmoid"

    def __init__(self, m: int = 8, quantile: float = 0.85, max_new_tokens: int | None = None,
                 temperature: float = 1.0):
        if not 0 <= quantile <= 1:
            raise ValueError(f"quantile must be in [0, 1], got {quantile}")
        self.draw, self.quantile = ReferenceDraw(m, max_new_tokens, temperature), quantile

    def __call__(self, values, prompts, completions, reference_rewards):
        reference = reference_percentile(reference_rewards.to(values.dtype), self.quantile)
        return log_sigmoid_centered(values, reference)


class ReferenceSampler:
    """M responses per prompt from a frozen reference policy, for PAR and log-sigmoid centring.

    Sample i of a prompt is drawn with its own seed, derived from (seed, prompt text, i) alone: it does not
    depend on the batch, the rank or the step, so a resumed run draws the same samples. The policy is fixed,
    so samples are cached per prompt and sampling settings (the first m of a larger draw are the smaller one).
    The model runs unsharded on its own device, out of lockstep with other ranks.
    """

    def __init__(self, model, tokenizer, *, sampling: SamplingConfig | None = None, tokenize=None,
                 seed: int = 0, batch_size: int = 64):
        from alignkit.data.tokenize import Encoder
        from alignkit.rollout.hf import TransformersGenerator

        self.model = model.eval().requires_grad_(False)
        self.encoder = Encoder(tokenizer, tokenize)
        self.generator = TransformersGenerator(self.model, tokenizer, batch_size=batch_size, lockstep=False)
        self.sampling, self.seed = sampling or SamplingConfig(), seed
        self.cache: dict[tuple, list[str]] = {}
        self.generated = 0   # completions drawn so far (cache misses)

    def seeds(self, prompt: Prompt, m: int) -> list[int]:
        """The seeds of a prompt's first m samples."""
        digest = hashlib.sha256(f"{self.seed}\0{prompt_key(prompt)}".encode()).digest()
        return [row_seed(int.from_bytes(digest[:8], "little"), i) for i in range(m)]

    def sampling_for(self, draw: ReferenceDraw) -> SamplingConfig:
        tokens = draw.max_new_tokens if draw.max_new_tokens is not None else self.sampling.max_new_tokens
        return dataclasses.replace(self.sampling, max_new_tokens=tokens, temperature=draw.temperature)

    def sample(self, prompts: Sequence[Prompt], draw: ReferenceDraw) -> list[list[str]]:
        """`draw.m` completion texts per prompt, in order (repeated prompts are sampled once)."""
        sampling = self.sampling_for(draw)
        keys = [(prompt_key(p), sampling.max_new_tokens, sampling.temperature) for p in prompts]
        short = {key: p for key, p in zip(keys, prompts, strict=True) if len(self.cache.get(key, ())) < draw.m}
        if short:
            self._extend(short, draw.m, sampling)
        return [self.cache[key][:draw.m] for key in keys]

    def _extend(self, short: dict[tuple, Prompt], m: int, sampling: SamplingConfig) -> None:
        ids, seeds, owners = [], [], []
        for key, prompt in short.items():
            have = len(self.cache.setdefault(key, []))
            encoded = self.encoder.encode(prompt).prompt
            for seed in self.seeds(prompt, m)[have:]:
                ids.append(encoded)
                seeds.append(seed)
                owners.append(key)
        completions = self.generator.generate(ids, sampling, seeds)
        for key, completion in zip(owners, completions, strict=True):
            self.cache[key].append(completion.text)
        self.generated += len(completions)


@contextmanager
def _diverted(stats: CallStats, into: CallStats) -> Iterator[None]:
    """Whatever `stats` counts inside the block is counted in `into` instead."""
    counters = [f.name for f in dataclasses.fields(CallStats) if f.name != "examples"]
    before, examples = {name: getattr(stats, name) for name in counters}, len(stats.examples)
    try:
        yield
    finally:
        for name in counters:
            setattr(into, name, getattr(into, name) + getattr(stats, name) - before[name])
            setattr(stats, name, before[name])
        into.examples.extend(stats.examples[examples:][:max(0, 5 - len(into.examples))])
        del stats.examples[examples:]


class Transformed:
    shardable = ("source",)
    """A reward source whose scores pass through `steps` in order; failures stay marked.

    Reference steps need a `ReferenceSampler` (`sampler=` or `bind_reference`); see the module docstring.
    """

    def __init__(self, source: RewardSource, *steps: Step, sampler: ReferenceSampler | None = None):
        self.source, self.steps = source, steps
        self.stats = source.stats
        self.reads_tokens = getattr(source, "reads_tokens", False)
        self.reads_columns = getattr(source, "reads_columns", False)
        self.reference_stats = CallStats()   # scoring of reference samples, kept out of `stats`
        self._check_order()
        self.bind_reference(sampler)

    def _check_order(self) -> None:
        later = [s.name for i, s in enumerate(self.steps) if isinstance(s, ReferenceStep)
                 and any(isinstance(t, ReferenceStep) for t in self.steps[:i])]
        if later:
            raise ConfigError(f"reward transform {later[0]!r} follows another reference step: reference "
                              f"rewards cannot pass through one (use one of par, log_sigmoid)")

    def _reference_steps(self) -> list[str]:
        return [step.name for step in self.steps if isinstance(step, ReferenceStep)]

    @property
    def needs_sampler(self) -> bool:
        """Whether a reference step here (or in a nested Transformed) still has no sampler."""
        own = self.sampler is None and bool(self._reference_steps())
        return own or bool(getattr(self.source, "needs_sampler", False))

    def bind_reference(self, sampler: ReferenceSampler | None) -> None:
        """Sample reference responses with `sampler` (here and in a nested Transformed); clears cached rewards."""
        self.sampler, self._rewards = sampler, {}
        if sampler is not None and hasattr(self.source, "bind_reference"):
            self.source.bind_reference(sampler)

    def score(self, prompts, completions, references=None, **tokens) -> Scores:
        if self.sampler is None and self._reference_steps():
            raise ConfigError(f"reward transform {self._reference_steps()[0]!r} needs responses sampled from a "
                              "reference policy, and none is bound here: it works in `alignkit rl` (which samples "
                              "the initial policy or `reference`), or call bind_reference(ReferenceSampler(...))")
        scores = self.source.score(prompts, completions, references, **tokens)
        values, failed = scores.values, scores.failed
        for index, step in enumerate(self.steps):
            if not isinstance(step, ReferenceStep):
                values = step(values, prompts, completions)
                continue
            reference = self._reference_values(index, prompts, references).to(values.device)
            missing = reference.isnan().all(1)
            if missing.any():   # no usable reference reward: a tie with the reference, marked failed
                reference = torch.where(missing[:, None], values[:, None].to(reference.dtype), reference)
                failed = scores.failure_mask().to(missing.device) | missing
            values = step(values, prompts, completions, reference)
        return Scores(values, scores.uncertainty, failed)

    def _reference_values(self, index: int, prompts, references) -> Tensor:
        """[n, M] rewards of the reference samples of each row's prompt, through the steps before `index`."""
        draw = self.steps[index].draw
        texts = self.sampler.sample(prompts, draw)
        values = self._reference_rewards(draw, prompts, references, texts).flatten()
        flat_prompts = [p for p in prompts for _ in range(draw.m)]
        flat_texts = [t for row in texts for t in row]
        for step in self.steps[:index]:
            values = getattr(step, "apply", step)(values, flat_prompts, flat_texts)
        return values.view(len(prompts), draw.m)

    def _reference_rewards(self, draw: ReferenceDraw, prompts, references, texts) -> Tensor:
        """The source's raw scores [n, M] of the reference samples (NaN where they failed), cached."""
        answers = references if references is not None else [None] * len(prompts)
        keys = [(prompt_key(p), a, draw.max_new_tokens, draw.temperature)
                for p, a in zip(prompts, answers, strict=True)]
        todo = {}
        for key, prompt, answer, row in zip(keys, prompts, answers, texts, strict=True):
            if len(self._rewards.get(key, ())) < draw.m:
                todo[key] = (prompt, answer, row)
        if todo:
            self._score_reference(todo)
        return torch.tensor([self._rewards[key][:draw.m] for key in keys], dtype=torch.float32)

    def _score_reference(self, todo: dict[tuple, tuple]) -> None:
        rows = [(key, prompt, answer, text) for key, (prompt, answer, texts) in todo.items()
                for text in texts[len(self._rewards.get(key, ())):]]
        with _diverted(self.source.stats, self.reference_stats):
            scores = self.source.score([r[1] for r in rows], [r[3] for r in rows], [r[2] for r in rows])
        values = scores.values.detach().float().cpu().masked_fill(scores.failure_mask(), float("nan"))
        for (key, *_), value in zip(rows, values.tolist(), strict=True):
            self._rewards.setdefault(key, []).append(value)

    def _stateful(self) -> dict:
        return {str(i): step for i, step in enumerate(self.steps) if hasattr(step, "state_dict")}

    def state_dict(self) -> dict:
        """Running statistics of stateful steps, for checkpoints (a resumed run normalises identically)."""
        return {key: step.state_dict() for key, step in self._stateful().items()}

    def load_state_dict(self, state: dict) -> None:
        for key, step in self._stateful().items():
            step.load_state_dict(state[key])


def build_steps(config: list[dict | str]) -> list[Step]:
    """Steps from config: ["running_norm", {"clip": {"low": -5, "high": 5}}, {"par": {"m": 4}}]."""
    steps = []
    for item in config:
        name, options = (item, {}) if isinstance(item, str) else next(iter(item.items()))
        steps.append(STEPS.get(name).fn(**(options or {})))
    return steps
