"""The online loop: sample prompts, generate G completions each, score, estimate advantages, update.

One step reads top to bottom in `train_step`: collect (generate + score, with DAPO dynamic
sampling), reference pass (old / reference log-probs, critic values), advantages through the
registry, PPO epochs over mini-batches split into micro-batches, weight sync to the rollout engine.
Advantages are computed on whole groups before any split, and every loss term divides by constants
of the whole mini-batch, so group statistics and gradients do not depend on the micro-batch size.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from alignkit.algorithms.advantages import ADVANTAGES, estimate
from alignkit.algorithms.policy import (
    AGGREGATIONS,
    IMPORTANCE_RATIOS,
    KL_ESTIMATORS,
    Totals,
    clipped_surrogate,
    clipped_value_loss,
    overlong_penalty,
    token_mean,
)
from alignkit.data.records import PromptRecord
from alignkit.data.tokenize import Encoded, collate
from alignkit.models.logprobs import policy_outputs
from alignkit.models.value import ValueModel, value_head
from alignkit.registry import Registry
from alignkit.rewards.base import RewardComparison
from alignkit.rollout import Completion, SamplingConfig
from alignkit.train.checkpoint import load_state, restore_weights, resume_point, save_checkpoint, set_rng_state
from alignkit.train.progress import ProgressReporter
from alignkit.train.rundir import RunDir
from alignkit.train.trainer import SCHEDULES, NonFiniteError, autocast

PREFERENCE_SIGNALS = Registry("preference signal")
PREFERENCE_SIGNALS.register("logit", summary="d_ij = logit P(i > j): reward differences under Bradley-Terry "
                            "(routing paper)")(lambda p: p.logits)
PREFERENCE_SIGNALS.register("sign", summary="d_ij = 2 P(i > j) - 1: +-1 for hard verdicts, 0 for ties "
                            "(Think-RM binary, without its 1/length confidence)")(lambda p: 2 * p.probs - 1)
CRITICS = ("separate", "shared")


@dataclass
class RLConfig:
    steps: int = 100
    prompts_per_step: int = 8
    group_size: int = 4
    advantage: str = "grpo"
    advantage_options: dict = field(default_factory=dict)
    normalize_advantages: bool = False   # whiten over the valid tokens of the batch (PPO)
    ppo_epochs: int = 1
    mini_batches: int = 1                # optimizer steps per epoch
    micro_batch_size: int | None = None  # completions per forward/backward; default: the mini-batch
    lr: float = 1e-5
    critic_lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"
    max_grad_norm: float = 1.0
    importance_ratio: str = "token"      # or "sequence" (GSPO)
    clip_low: float = 0.2
    clip_high: float = 0.2               # > clip_low: DAPO clip-higher
    dual_clip: float | None = None       # e.g. 3.0
    aggregation: str = "token-mean"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"             # in the loss; in the reward it is always k1
    kl_in: str = "loss"                  # or "reward"
    entropy_coef: float = 0.0
    critic: str = "separate"             # when the estimator needs values: separate model or shared-trunk head
    value_coef: float = 0.5
    value_clip: float | None = 0.2
    dynamic_sampling: bool = False       # DAPO: drop groups whose signal does not vary, sample more
    max_sampling_rounds: int = 4
    overlong_buffer: int = 0             # DAPO overlong shaping over the last N tokens; 0: off
    overlong_coef: float = 1.0
    preference_signal: str = "logit"
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    on_nonfinite: str = "stop"           # or "skip": drop the mini-batch and go on
    precision: str = "auto"
    seed: int = 0
    progress: bool = True


@dataclass
class Experience:
    """One step's completions, flattened prompt-major ([P*G]), and everything computed from them."""

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


def _pairs(g: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(g) for j in range(i + 1, g)]


def _whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    count = mask.sum().clamp(min=1)
    mean = (values * mask).sum() / count
    std = (((values - mean) ** 2 * mask).sum() / count).sqrt()
    return (values - mean) / (std + eps) * mask


def _last_token(mask: Tensor) -> Tensor:
    """One-hot [n, T] at each row's last completion token."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * mask).argmax(1)
    return torch.nn.functional.one_hot(last, mask.shape[1]).to(mask.dtype) * (mask.sum(1, keepdim=True) > 0)


TOKEN_ADVANTAGES = {  # estimator output kind -> (advantages [n, T], returns or None)
    "completion": lambda out, mask: (out.reshape(-1, 1) * mask, None),
    "token": lambda out, mask: (out * mask, None),
    "token_and_returns": lambda out, mask: (out[0] * mask, out[1] * mask),
}


class OnlineTrainer:
    """Online RL with any reward source or pairwise judge and any registered advantage estimator."""

    def __init__(self, policy, tokenizer, generator, prompts: list[Encoded], records: list[PromptRecord],
                 cfg: RLConfig, sampling: SamplingConfig, run: RunDir, *, reward=None, judge=None,
                 reference=None, eval_prompts: list[Encoded] = (), eval_records: list[PromptRecord] = (),
                 eval_reward=None):
        self.cfg, self.sampling, self.run = cfg, sampling, run
        self.policy, self.tokenizer, self.generator = policy, tokenizer, generator
        self.prompts, self.records = list(prompts), list(records)
        self.eval_prompts, self.eval_records, self.eval_reward = list(eval_prompts), list(eval_records), eval_reward
        self.estimator = ADVANTAGES.get(cfg.advantage)
        self.wants = set(self.estimator.meta["inputs"])
        self._check(reward, judge)
        self.reward = reward
        self.judge = judge if judge is not None or "preferences" not in self.wants else RewardComparison(reward)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.policy.to(self.device)
        self.reference = self._reference(reference)
        self.critic, self.head = self._critic()
        self.optimizer = self._optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step, self.cursor, self.nonfinite_skips = 0, 0, 0
        self.initial_metrics: dict = {}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # ----- set-up -----
    def _check(self, reward, judge) -> None:
        cfg = self.cfg
        for registry, name in ((AGGREGATIONS, cfg.aggregation), (KL_ESTIMATORS, cfg.kl_estimator),
                               (IMPORTANCE_RATIOS, cfg.importance_ratio),
                               (PREFERENCE_SIGNALS, cfg.preference_signal)):
            registry.get(name)
        if cfg.schedule not in SCHEDULES:
            raise ValueError(f"rl.schedule must be one of {sorted(SCHEDULES)}, got {cfg.schedule!r}")
        if cfg.critic not in CRITICS or cfg.kl_in not in ("loss", "reward") or cfg.on_nonfinite not in ("stop", "skip"):
            raise ValueError("rl.critic is separate|shared, rl.kl_in loss|reward, rl.on_nonfinite stop|skip")
        if cfg.overlong_buffer >= self.sampling.max_new_tokens:
            raise ValueError(f"rl.overlong_buffer ({cfg.overlong_buffer}) must be smaller than "
                             f"rollout.max_new_tokens ({self.sampling.max_new_tokens})")
        if cfg.group_size < 2 and self.estimator.meta["output"] == "completion" and "baseline" not in self.wants:
            raise ValueError(f"advantage {cfg.advantage!r} compares completions of a prompt: rl.group_size >= 2")
        if "preferences" in self.wants:
            if reward is None and judge is None:
                raise ValueError(f"advantage {cfg.advantage!r} needs a pairwise judge (or a reward source)")
            if cfg.overlong_buffer or (cfg.kl_coef and cfg.kl_in == "reward"):
                raise ValueError("pairwise advantages have no scalar reward: use rl.kl_in=loss and no overlong shaping")
        elif reward is None:
            raise ValueError(f"advantage {cfg.advantage!r} needs a reward source (reward=...)")

    def _reference(self, reference):
        if not self.cfg.kl_coef:
            return None
        reference = reference if reference is not None else copy.deepcopy(self.policy)
        return reference.to(self.device).eval().requires_grad_(False)

    def _critic(self):
        if "values" not in self.wants:
            return None, None
        if self.cfg.critic == "separate":
            return ValueModel(self.policy).to(self.device), None
        return None, value_head(self.policy.config.hidden_size).to(self.device)

    def _optimizer(self) -> torch.optim.Optimizer:
        groups = [{"params": [p for p in self.policy.parameters() if p.requires_grad], "lr": self.cfg.lr}]
        critic = self.critic or self.head
        if critic is not None:
            groups.append({"params": list(critic.parameters()), "lr": self.cfg.critic_lr})
        return torch.optim.AdamW(groups, weight_decay=self.cfg.weight_decay)

    def _lr_factor(self, step: int) -> float:
        if step < self.cfg.warmup_steps:
            return (step + 1) / self.cfg.warmup_steps
        span = max(1, self.cfg.steps - self.cfg.warmup_steps)
        return SCHEDULES[self.cfg.schedule](min(1.0, (step - self.cfg.warmup_steps) / span))

    def _autocast(self):
        return autocast(self.cfg.precision, self.device)

    # ----- collect: generate and score, with dynamic sampling -----
    def _next_prompts(self, n: int) -> list[int]:
        """The next `n` prompt indices of a seeded shuffled stream; the cursor is checkpointed."""
        out = []
        while len(out) < n:
            epoch, offset = divmod(self.cursor, len(self.prompts))
            order = list(range(len(self.prompts)))
            random.Random(self.cfg.seed * 1_000_003 + epoch).shuffle(order)
            take = order[offset:offset + n - len(out)]
            out += take
            self.cursor += len(take)
        return out

    def _seed(self, salt: int) -> int:
        """The sampling seed of this step: a function of (seed, step), so a resumed run samples the same."""
        return self.cfg.seed * 7919 + self.step * 131 + salt

    def _generate(self, prompts: list[list[int]], sampling: SamplingConfig, seed: int) -> list[Completion]:
        was_training = self.policy.training
        self.policy.eval()
        try:
            return self.generator.generate(prompts, sampling, seed=seed)
        finally:
            self.policy.train(was_training)

    def _score(self, records: list[PromptRecord], completions: list[Completion]) -> Tensor:
        prompts = [r.prompt for r in records]
        scores = self.reward.score(prompts, [c.text for c in completions], [r.reference for r in records])
        values = scores.values.float().cpu()
        if self.cfg.overlong_buffer:
            lengths = torch.tensor([len(c) for c in completions])
            values = values + self.cfg.overlong_coef * overlong_penalty(
                lengths, self.sampling.max_new_tokens, self.cfg.overlong_buffer)
        return values

    def _judge(self, records: list[PromptRecord], completions: list[Completion], g: int) -> Tensor:
        """Skew-symmetric [P, G, G]: one judge call per unordered pair, d_ji = -d_ij."""
        pairs = _pairs(g)
        prompts, a, b = [], [], []
        for p, record in enumerate(records[::g]):
            for i, j in pairs:
                prompts.append(record.prompt)
                a.append(completions[p * g + i].text)
                b.append(completions[p * g + j].text)
        signal = PREFERENCE_SIGNALS.get(self.cfg.preference_signal).fn(self.judge.compare(prompts, a, b)).float()
        d = torch.zeros(len(records) // g, g, g)
        rows = torch.arange(len(records) // g).repeat_interleave(len(pairs))
        first = torch.tensor([i for i, _ in pairs]).repeat(len(records) // g)
        second = torch.tensor([j for _, j in pairs]).repeat(len(records) // g)
        d[rows, first, second] = signal.cpu()
        d[rows, second, first] = -signal.cpu()
        return d

    def collect(self, timer: PhaseTimer) -> tuple[Experience, dict]:
        g, wanted = self.cfg.group_size, self.cfg.prompts_per_step
        kept_records, kept_completions, kept_signal = [], [], []
        rounds, seen, flat = 0, 0, 0
        while len(kept_signal) < wanted and rounds < (self.cfg.max_sampling_rounds if self.cfg.dynamic_sampling else 1):
            ids = self._next_prompts(wanted - len(kept_signal))
            records = [self.records[i] for i in ids for _ in range(g)]
            with timer("generate"):
                completions = self._generate([self.prompts[i].prompt for i in ids for _ in range(g)],
                                             self.sampling, self._seed(rounds))
            with timer("score"):
                signal = (self._judge(records, completions, g) if "preferences" in self.wants
                          else self._score(records, completions).view(-1, g))
            varies = (signal.flatten(1).amax(1) - signal.flatten(1).amin(1)) > 0
            flat += int((~varies).sum())
            seen += len(ids)
            for p in range(len(ids)):
                if varies[p] or not self.cfg.dynamic_sampling:
                    kept_records += records[p * g:(p + 1) * g]
                    kept_completions += completions[p * g:(p + 1) * g]
                    kept_signal.append(signal[p])
            rounds += 1
        stacked = torch.stack(kept_signal) if kept_signal else None
        experience = Experience(kept_records, kept_completions,
                                None if "preferences" in self.wants else stacked,
                                stacked if "preferences" in self.wants else None)
        return experience, {"zero_variance_groups": flat / max(seen, 1), "sampling_rounds": rounds,
                            "groups": len(kept_signal)}

    # ----- reference pass: old and reference log-probs, critic values -----
    def _micro(self, n: int) -> int:
        return self.cfg.micro_batch_size or max(1, math.ceil(n / self.cfg.mini_batches))

    def _updates_per_step(self) -> int:
        return self.cfg.ppo_epochs * self.cfg.mini_batches

    @torch.no_grad()
    def _token_pass(self, exp: Experience, fn) -> Tensor:
        parts = []
        for rows in torch.arange(len(exp)).split(self._micro(len(exp))):
            with self._autocast():
                parts.append(fn(exp.input_ids[rows], exp.attention_mask[rows], exp.mask[rows]).float())
        return torch.cat(parts)

    def prepare(self, exp: Experience) -> None:
        encoded = [Encoded(c.prompt_ids, c.token_ids) for c in exp.completions]
        batch = collate(encoded, self.pad_id).to(self.device)
        exp.input_ids, exp.attention_mask, exp.mask = batch.input_ids, batch.attention_mask, batch.score_mask.float()
        temperature = self.sampling.temperature or 1.0

        def logprobs_of(model):
            return lambda ids, att, mask: policy_outputs(model, ids, att, mask, temperature=temperature).logprobs

        needs_old = self._updates_per_step() > 1 or (self.cfg.kl_coef and self.cfg.kl_in == "reward")
        self.policy.eval()
        if needs_old:
            exp.old_logprobs = self._token_pass(exp, logprobs_of(self.policy))
        if self.reference is not None:
            exp.ref_logprobs = self._token_pass(exp, logprobs_of(self.reference))
        if self.critic is not None:
            exp.old_values = self._token_pass(exp, self.critic)
        elif self.head is not None:
            exp.old_values = self._token_pass(exp, lambda ids, att, mask: policy_outputs(
                self.policy, ids, att, mask, temperature=temperature, value_head=self.head).values)
        self.policy.train()

    # ----- advantages, always through the registry -----
    def _kl_reward(self, exp: Experience) -> Tensor | None:
        if not (self.cfg.kl_coef and self.cfg.kl_in == "reward"):
            return None
        return self.cfg.kl_coef * (exp.old_logprobs - exp.ref_logprobs) * exp.mask  # k1 per token

    def _baseline(self, exp: Experience) -> Tensor:
        """ReMax: the reward of the policy's greedy completion of each prompt."""
        g = self.cfg.group_size
        greedy = dataclasses.replace(self.sampling, temperature=0.0)
        records = exp.records[::g]
        completions = self._generate([c.prompt_ids for c in exp.completions[::g]], greedy, self._seed(9999))
        return self._score(records, completions)

    def advantages(self, exp: Experience) -> None:
        kl = self._kl_reward(exp)
        g = self.cfg.group_size
        inputs = {"preferences": exp.preferences, "mask": exp.mask, "values": exp.old_values}
        if exp.rewards is not None:
            rewards = exp.rewards.to(self.device)
            token_rewards = _last_token(exp.mask) * rewards.reshape(-1, 1)
            if kl is not None:
                rewards = rewards - kl.sum(1).view(-1, g)
                token_rewards = token_rewards - kl
            lengths = exp.mask.sum(1).view(-1, g)
            inputs.update(rewards=rewards, token_rewards=token_rewards, lengths=lengths)
        if "baseline" in self.wants:
            inputs["baseline"] = self._baseline(exp).to(self.device)
        out = estimate(self.cfg.advantage, inputs, **self.cfg.advantage_options)
        exp.advantages, exp.returns = TOKEN_ADVANTAGES[self.estimator.meta["output"]](out, exp.mask)
        if self.cfg.normalize_advantages:
            exp.advantages = _whiten(exp.advantages, exp.mask)

    # ----- update -----
    def micro_loss(self, exp: Experience, rows: Tensor, totals: Totals, sums: dict) -> Tensor:
        cfg, mask = self.cfg, exp.mask[rows]
        aggregate = AGGREGATIONS.get(cfg.aggregation).fn
        with self._autocast():
            out = policy_outputs(self.policy, exp.input_ids[rows], exp.attention_mask[rows], exp.mask[rows],
                                 temperature=self.sampling.temperature or 1.0, entropy_grad=cfg.entropy_coef > 0,
                                 value_head=self.head)
        old = exp.old_logprobs[rows] if exp.old_logprobs is not None else out.logprobs.detach()
        log_ratio = IMPORTANCE_RATIOS.get(cfg.importance_ratio).fn(out.logprobs, old, mask)
        terms = clipped_surrogate(log_ratio, exp.advantages[rows], mask, clip_low=cfg.clip_low,
                                  clip_high=cfg.clip_high, dual_clip=cfg.dual_clip)
        policy_loss = aggregate(terms.loss, mask, totals)
        loss = policy_loss
        if self.reference is not None:
            kl = KL_ESTIMATORS.get(cfg.kl_estimator).fn(out.logprobs, exp.ref_logprobs[rows]) * mask
            if cfg.kl_in == "loss":
                loss = loss + cfg.kl_coef * aggregate(kl, mask, totals)
            sums["kl"] += float(kl.detach().sum())
        if cfg.entropy_coef:
            loss = loss - cfg.entropy_coef * aggregate(out.entropy, mask, totals)
        if exp.old_values is not None:
            values = out.values if self.head is not None else self.critic(
                exp.input_ids[rows], exp.attention_mask[rows], exp.mask[rows])
            value_loss = token_mean(clipped_value_loss(values, exp.old_values[rows], exp.returns[rows],
                                                       clip=cfg.value_clip), mask, totals)
            loss = loss + cfg.value_coef * value_loss
            sums["value_loss"] += float(value_loss.detach())
        sums["policy_loss"] += float(policy_loss.detach())
        sums["entropy"] += float((out.entropy.detach() * mask).sum())
        sums["clipped"] += float(terms.clipped.sum())
        sums["dual_clipped"] += float(terms.dual_clipped.sum())
        sums["ratio"] += float((terms.ratio * mask).sum())
        sums["ratio_max"] = max(sums["ratio_max"], float((terms.ratio * mask).max()))
        sums["ratio_min"] = min(sums.get("ratio_min", math.inf), float(terms.ratio[mask.bool()].min()))
        return loss

    def _clip_and_step(self) -> float:
        clip = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else math.inf
        norms = [torch.nn.utils.clip_grad_norm_([p for p in group["params"] if p.grad is not None], clip)
                 for group in self.optimizer.param_groups]
        policy_norm = float(norms[0])
        if not all(math.isfinite(float(n)) for n in norms):
            raise FloatingPointError("gradient norm")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return policy_norm

    def update(self, exp: Experience) -> dict:
        sums, grad_norms = defaultdict(float), []
        n, generator = len(exp), torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step)
        for _ in range(self.cfg.ppo_epochs):
            order = torch.randperm(n, generator=generator)
            for mini in order.chunk(self.cfg.mini_batches):
                totals = Totals.of(exp.mask[mini], self.sampling.max_new_tokens)
                try:
                    for rows in mini.split(self._micro(n)):
                        loss = self.micro_loss(exp, rows, totals, sums)
                        if not torch.isfinite(loss):
                            raise FloatingPointError("loss")
                        loss.backward()
                    grad_norms.append(self._clip_and_step())
                except FloatingPointError as err:
                    self._nonfinite(str(err))
        self.scheduler.step()
        tokens = float(exp.mask.sum()) * self.cfg.ppo_epochs
        out = {"loss/policy": sums["policy_loss"] / self._updates_per_step(),
               "entropy": sums["entropy"] / tokens, "clip_fraction": sums["clipped"] / tokens,
               "dual_clip_fraction": sums["dual_clipped"] / tokens, "ratio/mean": sums["ratio"] / tokens,
               "ratio/max": sums["ratio_max"], "ratio/min": sums.get("ratio_min", 1.0),
               "grad_norm": sum(grad_norms) / max(len(grad_norms), 1), "lr": self.scheduler.get_last_lr()[0]}
        if self.reference is not None:
            out["kl"] = sums["kl"] / tokens
        if exp.old_values is not None:
            out["loss/value"] = sums["value_loss"] / self._updates_per_step()
        return out

    def _nonfinite(self, what: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        where = f"non-finite {what} at RL step {self.step + 1}"
        if self.cfg.on_nonfinite == "skip" and self.nonfinite_skips < 10:
            self.nonfinite_skips += 1
            self.run.log({"step": self.step + 1, "event": "skipped_nonfinite", "detail": where})
            return
        saved = self.save()
        raise NonFiniteError(f"{where}; the last good weights are saved in {saved}. "
                             "Lower rl.lr, check the reward, or set rl.on_nonfinite=skip.")

    # ----- one step -----
    def train_step(self) -> dict:
        timer, started = PhaseTimer(), time.perf_counter()
        counts = self._source_counts()
        exp, sampling = self.collect(timer)
        if exp.rewards is None and exp.preferences is None:
            self.run.log({"step": self.step + 1, "event": "no_varied_groups"})
            return {**sampling, **self._phase_metrics(timer, started, 0)}
        with timer("reference"):
            self.prepare(exp)
        with timer("advantage"):
            self.advantages(exp)
        with timer("update"):
            metrics = self.update(exp)
        with timer("sync"):
            self.generator.sync_weights(self.policy)
        metrics.update(sampling)
        metrics.update(self._signal_metrics(exp))
        metrics.update({key: value - counts[key] for key, value in self._source_counts().items()})
        metrics.update(self._phase_metrics(timer, started, int(sum(len(c) for c in exp.completions))))
        return metrics

    def _source_counts(self) -> dict:
        """Cumulative calls, scored items (pairs for a judge) and failures of the signal's source."""
        kind, source = ("judge", self.judge) if "preferences" in self.wants else ("reward", self.reward)
        stats = source.stats
        return {f"{kind}/calls": stats.calls, f"{kind}/items": stats.items, f"{kind}/failures": stats.failures}

    def _signal_metrics(self, exp: Experience) -> dict:
        lengths = exp.mask.sum(1)
        valid = exp.advantages[exp.mask.bool()]
        out = {"response_length/mean": float(lengths.mean()), "response_length/max": float(lengths.max()),
               "truncated": sum(c.finish_reason == "length" for c in exp.completions) / len(exp),
               "advantage/mean": float(valid.mean()), "advantage/std": float(valid.std()) if len(valid) > 1 else 0.0,
               "advantage/min": float(valid.min()), "advantage/max": float(valid.max())}
        if exp.rewards is not None:
            out.update({"reward/mean": float(exp.rewards.mean()), "reward/std": float(exp.rewards.std())})
        if exp.preferences is not None:
            out["preference/abs_mean"] = float(exp.preferences.abs().mean())
        if hasattr(self.judge, "metrics"):  # the router: strong-judge calls and their share, cumulative
            out.update(self.judge.metrics("router"))
        return out

    @staticmethod
    def _phase_metrics(timer: PhaseTimer, started: float, tokens: int) -> dict:
        elapsed = time.perf_counter() - started
        out = {f"time/{phase}": seconds for phase, seconds in timer.seconds.items()}
        out.update({"time/step": elapsed, "tokens_per_s": tokens / elapsed})
        return out

    # ----- evaluation: held-out prompts, greedy and sampled, scored by the eval reward -----
    def _eval_reward_of(self, sampling: SamplingConfig, seed: int) -> tuple[float, float]:
        completions = self._generate([e.prompt for e in self.eval_prompts], sampling, seed)
        scores = self.eval_reward.score([r.prompt for r in self.eval_records], [c.text for c in completions],
                                        [r.reference for r in self.eval_records])
        return float(scores.values.float().mean()), sum(len(c) for c in completions) / len(completions)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean eval reward of greedy completions, and of one sample per prompt at the training temperature
        (seeded the same at every evaluation)."""
        if not self.eval_prompts or self.eval_reward is None:
            return {}
        greedy, length = self._eval_reward_of(dataclasses.replace(self.sampling, temperature=0.0), 0)
        sampled, _ = self._eval_reward_of(self.sampling, self.cfg.seed * 7919 - 2)
        return {"eval/reward": greedy, "eval/sampled_reward": sampled, "eval/response_length": length}

    # ----- checkpoints -----
    def _state(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "cursor": self.cursor, "nonfinite_skips": self.nonfinite_skips}
        for name, part in (("critic", self.critic), ("head", self.head), ("reward", self.reward),
                           ("judge", self.judge)):
            if part is not None and hasattr(part, "state_dict"):
                state[name] = part.state_dict()
        return state

    def save(self) -> Path:
        return save_checkpoint(self.run.checkpoints, self.step, self.policy, self.tokenizer, self._state(),
                               keep=self.cfg.keep_checkpoints)

    def _restore(self, checkpoint: Path) -> None:
        restore_weights(self.policy, checkpoint)
        state = load_state(checkpoint)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for name in ("critic", "head", "reward", "judge"):
            if name in state:
                getattr(self, name).load_state_dict(state[name])
        self.cursor, self.nonfinite_skips, self.step = state["cursor"], state["nonfinite_skips"], state["step"]
        set_rng_state(state["rng"])
        self.run.truncate_metrics(self.step)
        self.generator.sync_weights(self.policy)

    # ----- the loop -----
    def fit(self, resume: bool = False) -> dict:
        checkpoint = resume_point(self.run.checkpoints, resume)
        if checkpoint is not None:
            self._restore(checkpoint)
        else:
            self.initial_metrics = self.evaluate()
            self.run.log({"step": 0, **self.initial_metrics})
        progress = ProgressReporter(self.cfg.steps, self.run.path.name, start=self.step, enabled=self.cfg.progress)
        try:
            while self.step < self.cfg.steps:
                metrics = self.train_step()
                self.step += 1
                self.run.log({"step": self.step, **{f"train/{k}": v for k, v in metrics.items()}})
                if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and self.step < self.cfg.steps:
                    self.run.log({"step": self.step, **self.evaluate()})
                if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < self.cfg.steps:
                    self.save()
                progress.update(self.step, metrics)
        finally:
            progress.close()
        final = self.evaluate()
        self.run.log({"step": self.step, **final})
        self.save()
        return final
