"""Experience collection for online RL: pick prompts, generate G completions each, score or judge them.

Under torchrun each rank takes a contiguous share of the step's prompts with all G completions of
each (a group never straddles two ranks). Every completion's sampling seed is a function of
(seed, step, sampling round, its position in the step's whole batch), so a run samples the same
completions at any world size.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from alignkit import distributed
from alignkit.algorithms.policy import overlong_penalty
from alignkit.data.records import PromptRecord
from alignkit.data.tokenize import Encoded
from alignkit.registry import Registry
from alignkit.rollout import Completion, SamplingConfig

PREFERENCE_SIGNALS = Registry("preference signal")
PREFERENCE_SIGNALS.register("logit", summary="d_ij = logit P(i > j): reward differences under Bradley-Terry "
                            "(routing paper)")(lambda p: p.logits)
PREFERENCE_SIGNALS.register("sign", summary="d_ij = 2 P(i > j) - 1: +-1 for hard verdicts, 0 for ties "
                            "(Think-RM binary, without its 1/length confidence)")(lambda p: 2 * p.probs - 1)


@dataclass
class Experience:
    """One step's completions on this rank, flattened prompt-major ([P*G]), and what is computed from them."""

    records: list[PromptRecord]
    completions: list[Completion]
    rewards: Tensor | None            # [P, G]
    preferences: Tensor | None        # [P, G, G]
    input_ids: Tensor = None
    attention_mask: Tensor = None
    mask: Tensor = None               # completion tokens, float [n, T]
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    old_values: Tensor | None = None
    advantages: Tensor = None
    returns: Tensor | None = None

    def __len__(self) -> int:
        return len(self.completions)


@dataclass
class Group:
    """One prompt's G completions and their signal: rewards [G] or preferences [G, G]."""

    records: list[PromptRecord]
    completions: list[Completion]
    signal: Tensor

    @property
    def varies(self) -> bool:
        return bool(self.signal.max() > self.signal.min())


class PhaseTimer:
    def __init__(self):
        self.seconds = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - started


def sampling_seed(seed: int, step: int, salt: int, position: int) -> int:
    """A completion's sampling seed from (run seed, step, round or purpose, position in the whole batch)."""
    return (((seed * 1_000_003 + step) * 8191 + salt) * 1_048_573 + position) % (2**63 - 1)


def score_completions(source, records: list[PromptRecord], completions: list[Completion]):
    """`source`'s Scores of generated completions: a source that reads tokens (`reads_tokens`) also gets the
    generated ids, one that reads columns (`reads_columns`) the prompt records' other fields."""
    extra = {}
    if getattr(source, "reads_tokens", False):
        extra["tokens"] = [(c.prompt_ids, c.token_ids) for c in completions]
    if getattr(source, "reads_columns", False):
        extra["columns"] = [getattr(r, "columns", {}) for r in records]
    return source.score([r.prompt for r in records], [c.text for c in completions],
                        [r.reference for r in records], **extra)


def _pairs(g: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(g) for j in range(i + 1, g)]


class Collector:
    """Prompts in a seeded shuffled stream (the cursor is checkpointed), generation, scoring, judging."""

    def __init__(self, prompts: list[Encoded], records: list[PromptRecord], generator, sampling: SamplingConfig,
                 cfg, *, reward=None, judge=None, wants_preferences: bool = False, seed: int = 0):
        self.prompts, self.records, self.generator, self.sampling = list(prompts), list(records), generator, sampling
        self.cfg, self.reward, self.judge, self.seed = cfg, reward, judge, seed
        self.wants_preferences = wants_preferences
        self.cursor = 0

    def next_prompts(self, n: int) -> list[int]:
        """The next `n` prompt indices of the stream (the same on every rank)."""
        out = []
        while len(out) < n:
            epoch, offset = divmod(self.cursor, len(self.prompts))
            order = list(range(len(self.prompts)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            take = order[offset:offset + n - len(out)]
            out += take
            self.cursor += len(take)
        return out

    def generate(self, policy, prompts: list[list[int]], sampling: SamplingConfig, seeds,
                 generator=None) -> list[Completion]:
        """Completions from `generator` (default: the policy's rollout engine), the policy in eval mode meanwhile."""
        was_training = policy.training
        policy.eval()
        try:
            return (generator or self.generator).generate(prompts, sampling, seed=seeds)
        finally:
            policy.train(was_training)

    def score(self, records: list[PromptRecord], completions: list[Completion]) -> Tensor:
        """Rewards of the completions, with DAPO's overlong shaping when configured."""
        values = score_completions(self.reward, records, completions).values.float().cpu()
        if self.cfg.overlong_buffer:
            lengths = torch.tensor([len(c) for c in completions])
            values = values + self.cfg.overlong_coef * overlong_penalty(
                lengths, self.sampling.max_new_tokens, self.cfg.overlong_buffer)
        return values

    def judge_groups(self, records: list[PromptRecord], completions: list[Completion], g: int) -> Tensor:
        """Skew-symmetric [P, G, G]: one judge call per unordered pair, d_ji = -d_ij."""
        pairs, n_prompts = _pairs(g), len(records) // g
        prompts, a, b = [], [], []
        for p, record in enumerate(records[::g]):
            for i, j in pairs:
                prompts.append(record.prompt)
                a.append(completions[p * g + i].text)
                b.append(completions[p * g + j].text)
        signal = PREFERENCE_SIGNALS.get(self.cfg.preference_signal).fn(self.judge.compare(prompts, a, b)).float()
        d = torch.zeros(n_prompts, g, g)
        rows = torch.arange(n_prompts).repeat_interleave(len(pairs))
        first = torch.tensor([i for i, _ in pairs]).repeat(n_prompts)
        second = torch.tensor([j for _, j in pairs]).repeat(n_prompts)
        d[rows, first, second] = signal.cpu()
        d[rows, second, first] = -signal.cpu()
        return d

    def sample_round(self, policy, step: int, round_: int, n: int, timer: PhaseTimer) -> list[Group]:
        """This rank's groups of the next `n` prompts of the stream (n splits evenly over the ranks)."""
        g = self.cfg.group_size
        everyone = self.next_prompts(n)
        positions = distributed.shard_of(list(range(n)))
        ids = [everyone[k] for k in positions]
        records = [self.records[i] for i in ids for _ in range(g)]
        seeds = [sampling_seed(self.seed, step, round_, k * g + j) for k in positions for j in range(g)]
        with timer("generate"):
            completions = self.generate(policy, [self.prompts[i].prompt for i in ids for _ in range(g)],
                                        self.sampling, seeds)
        with timer("score"):
            signal = (self.judge_groups(records, completions, g) if self.wants_preferences
                      else self.score(records, completions).view(-1, g))
        return [Group(records[p * g:(p + 1) * g], completions[p * g:(p + 1) * g], signal[p])
                for p in range(len(ids))]

    def collect(self, policy, step: int, timer: PhaseTimer) -> tuple[Experience, dict]:
        """This rank's share of the step's groups.

        With dynamic sampling (DAPO) groups whose signal does not vary are dropped and more prompts are
        sampled, up to `max_sampling_rounds` rounds. The kept groups of every rank are gathered after each
        round (so all ranks agree on what is still missing), and the step's groups are then shared out
        again in equal contiguous parts; a round samples the missing count rounded up to a multiple of the
        world size, so more than one rank may give different (equally valid) batches than one process.
        """
        wanted, world = self.cfg.prompts_per_step, distributed.world_size()
        if not self.cfg.dynamic_sampling:
            mine = self.sample_round(policy, step, 0, wanted, timer)
            flat = distributed.reduce_sums({"n": sum(not group.varies for group in mine)})["n"]
            return self._experience(mine), {"zero_variance_groups": flat / wanted, "sampling_rounds": 1,
                                            "groups": wanted}
        kept, rounds, seen, flat = [], 0, 0, 0
        while len(kept) < wanted and rounds < self.cfg.max_sampling_rounds:
            n = -(-(wanted - len(kept)) // world) * world
            everyone = [group for part in distributed.gather_objects(self.sample_round(policy, step, rounds, n, timer))
                        for group in part]
            kept += [group for group in everyone if group.varies]
            seen, flat, rounds = seen + n, flat + sum(not group.varies for group in everyone), rounds + 1
        kept = kept[:wanted][:len(kept[:wanted]) // world * world]
        return self._experience(distributed.shard_of(kept)), {
            "zero_variance_groups": flat / max(seen, 1), "sampling_rounds": rounds, "groups": len(kept)}

    def _experience(self, groups: list[Group]) -> Experience:
        signal = torch.stack([group.signal for group in groups]) if groups else None
        return Experience([r for group in groups for r in group.records],
                          [c for group in groups for c in group.completions],
                          None if self.wants_preferences else signal, signal if self.wants_preferences else None)
