"""Online RL in the loop: collect, reference pass, advantages, PPO epochs, weight sync.

One step reads top to bottom in `train_step`: collect (generate + score, `train/experience.py`),
reference pass (old / reference log-probs, critic values), advantages through the registry
(`train/signals.py`), PPO epochs over mini-batches split into micro-batches, weight sync to the
rollout engine. Every loss term divides by constants of the whole mini-batch over all ranks
(`Totals`), so gradients depend neither on the micro-batch size nor on the world size.

Mini-batches are strided over the step's completions (completion i of the whole batch goes to
mini-batch i mod M, the mini-batches taken in a seeded order each epoch): the split is the same at
any world size, and every rank holds the same number of rows of each mini-batch.
"""

from __future__ import annotations

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

from alignkit import distributed
from alignkit.algorithms.advantages import ADVANTAGES
from alignkit.algorithms.policy import (
    AGGREGATIONS,
    IMPORTANCE_RATIOS,
    KL_ESTIMATORS,
    Totals,
    clipped_surrogate,
    clipped_value_loss,
    token_mean,
)
from alignkit.data.records import PromptRecord
from alignkit.data.tokenize import Encoded, collate
from alignkit.models.logprobs import policy_outputs
from alignkit.models.value import ValueModel, value_head
from alignkit.rewards.base import RewardComparison
from alignkit.rollout import SamplingConfig
from alignkit.train import signals
from alignkit.train.checkpoint import export_model
from alignkit.train.experience import (
    PREFERENCE_SIGNALS,
    Collector,
    Experience,
    PhaseTimer,
    sampling_seed,
    score_completions,
)
from alignkit.train.loop import Loop

CRITICS = ("separate", "shared")


class RewardFailureError(RuntimeError):
    """Most of a step's rewards or verdicts failed: the run stops rather than train on failure scores."""


@dataclass
class RLConfig:
    """Online-only options (`rl.*`); steps, learning rate, schedule, precision, cadence are `train.*`."""

    prompts_per_step: int = 8            # over all ranks
    group_size: int = 4
    advantage: str = "grpo"
    advantage_options: dict = field(default_factory=dict)   # the estimator's options, e.g. {gamma: 1, lam: 0.95}
    normalize_advantages: bool = False   # whiten over the valid tokens of the batch (PPO)
    ppo_epochs: int = 1
    mini_batches: int = 1                # optimizer steps per epoch
    critic_lr: float = 1e-5
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
    overlong_coef: float = 1.0           # weight of the overlong penalty
    preference_signal: str = "logit"
    max_failure_rate: float = 0.5        # a step whose failed scores exceed this share stops the run (1: never)

    RANGES = {"max_failure_rate": (0, 1), "prompts_per_step": (1, None), "group_size": (1, None),
              "ppo_epochs": (1, None), "mini_batches": (1, None), "critic_lr": (0, None), "clip_low": (0, None),
              "clip_high": (0, None), "dual_clip": (1, None), "kl_coef": (0, None), "entropy_coef": (0, None),
              "value_coef": (0, None), "value_clip": (0, None), "max_sampling_rounds": (1, None),
              "overlong_buffer": (0, None)}
    CHOICES = {"advantage": ADVANTAGES.names, "aggregation": AGGREGATIONS.names, "kl_estimator": KL_ESTIMATORS.names,
               "importance_ratio": IMPORTANCE_RATIOS.names, "preference_signal": PREFERENCE_SIGNALS.names,
               "kl_in": ("loss", "reward"), "critic": CRITICS}


def make_critic(policy, cfg: RLConfig):
    """(separate value model, shared-trunk value head): the one the estimator needs, or (None, None)."""
    if "values" not in ADVANTAGES.get(cfg.advantage).meta["inputs"]:
        return None, None
    if cfg.critic == "separate":
        return ValueModel(policy), None
    return None, value_head(policy.config.hidden_size)


class OnlineMethod:
    """Online RL with any reward source or pairwise judge and any registered advantage estimator."""

    def __init__(self, policy, tokenizer, generator, prompts: list[Encoded], records: list[PromptRecord],
                 cfg: RLConfig, sampling: SamplingConfig, *, steps: int, seed: int = 0, micro_batch_size=None,
                 lr: float = 1e-5, reward=None, judge=None, reference=None, critic=None, head=None,
                 eval_prompts: list[Encoded] = (), eval_records: list[PromptRecord] = (), eval_reward=None):
        self.cfg, self.sampling, self.total_steps, self.seed = cfg, sampling, steps, seed
        self.micro_batch_size, self.lr = micro_batch_size, lr
        self.policy, self.tokenizer, self.generator = policy, tokenizer, generator
        self.eval_prompts, self.eval_records, self.eval_reward = list(eval_prompts), list(eval_records), eval_reward
        self.estimator = ADVANTAGES.get(cfg.advantage)
        self.wants = set(self.estimator.meta["inputs"])
        self._check(reward, judge)
        self.reward = reward
        self.judge = judge if judge is not None or "preferences" not in self.wants else RewardComparison(reward)
        self.device = distributed.device()
        self.reference = self._reference(reference)
        self.critic, self.head = (critic, head) if critic is not None or head is not None else make_critic(policy, cfg)
        self.collector = Collector(prompts, records, generator, sampling, cfg, reward=self.reward, judge=self.judge,
                                   wants_preferences="preferences" in self.wants, seed=seed)
        self.step = 0
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # ----- set-up -----
    def _check(self, reward, judge) -> None:
        cfg, world = self.cfg, distributed.world_size()
        for registry, name in ((AGGREGATIONS, cfg.aggregation), (KL_ESTIMATORS, cfg.kl_estimator),
                               (IMPORTANCE_RATIOS, cfg.importance_ratio),
                               (PREFERENCE_SIGNALS, cfg.preference_signal)):
            registry.get(name)
        supported = IMPORTANCE_RATIOS.get(cfg.importance_ratio).meta.get("aggregations")
        if supported and cfg.aggregation not in supported:
            raise ValueError(f"rl.importance_ratio={cfg.importance_ratio} needs rl.aggregation in {supported}: "
                             f"{cfg.aggregation} would weight completions by length and lose the ratio's 1/|y|")
        if cfg.critic not in CRITICS or cfg.kl_in not in ("loss", "reward"):
            raise ValueError("rl.critic is separate|shared, rl.kl_in loss|reward")
        if cfg.overlong_buffer >= self.sampling.max_new_tokens:
            raise ValueError(f"rl.overlong_buffer ({cfg.overlong_buffer}) must be smaller than "
                             f"rollout.max_new_tokens ({self.sampling.max_new_tokens})")
        if cfg.group_size < 2 and self.estimator.meta["output"] == "completion" and "baseline" not in self.wants:
            raise ValueError(f"advantage {cfg.advantage!r} compares completions of a prompt: rl.group_size >= 2")
        if cfg.prompts_per_step % world or (world > 1 and cfg.prompts_per_step // world * cfg.group_size
                                            % cfg.mini_batches):
            raise ValueError(f"rl.prompts_per_step ({cfg.prompts_per_step}) must split evenly over {world} ranks, "
                             "and each rank's completions evenly into rl.mini_batches")
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

    def modules(self) -> dict:
        critic = self.critic or self.head
        return {"policy": self.policy, **({"critic": critic} if critic is not None else {})}

    def param_groups(self) -> list[dict]:
        groups = [{"params": [p for p in self.policy.parameters() if p.requires_grad], "lr": self.lr}]
        critic = self.critic or self.head
        if critic is not None:
            groups.append({"params": list(critic.parameters()), "lr": self.cfg.critic_lr})
        return groups

    def prepare(self, loop: Loop, resuming: bool) -> None:
        if resuming:
            self.generator.sync_weights(self.policy)

    # ----- reference pass: old and reference log-probs, critic values -----
    def _micro(self, n: int) -> int:
        return self.micro_batch_size or max(1, math.ceil(n / self.cfg.mini_batches))

    def _updates_per_step(self) -> int:
        return self.cfg.ppo_epochs * self.cfg.mini_batches

    @torch.no_grad()
    def _token_pass(self, exp: Experience, fn, loop: Loop) -> Tensor:
        parts = []
        for rows in torch.arange(len(exp)).split(self._micro(len(exp))):
            with loop.autocast():
                parts.append(fn(exp.input_ids[rows], exp.attention_mask[rows], exp.mask[rows]).float())
        return torch.cat(parts)

    def reference_pass(self, exp: Experience, loop: Loop) -> None:
        encoded = [Encoded(c.prompt_ids, c.token_ids) for c in exp.completions]
        batch = collate(encoded, self.pad_id).to(self.device)
        exp.input_ids, exp.attention_mask, exp.mask = batch.input_ids, batch.attention_mask, batch.score_mask.float()
        temperature = self.sampling.temperature or 1.0

        def logprobs_of(model):
            return lambda ids, att, mask: policy_outputs(model, ids, att, mask, temperature=temperature).logprobs

        needs_old = self._updates_per_step() > 1 or (self.cfg.kl_coef and self.cfg.kl_in == "reward")
        self.policy.eval()
        if needs_old:
            exp.old_logprobs = self._token_pass(exp, logprobs_of(self.policy), loop)
        if self.reference is not None:
            exp.ref_logprobs = self._token_pass(exp, logprobs_of(self.reference), loop)
        if self.critic is not None:
            exp.old_values = self._token_pass(exp, self.critic, loop)
        elif self.head is not None:
            exp.old_values = self._token_pass(exp, lambda ids, att, mask: policy_outputs(
                self.policy, ids, att, mask, temperature=temperature, value_head=self.head).values, loop)
        self.policy.train()

    def _baseline(self, exp: Experience) -> Tensor:
        """ReMax: the reward of the policy's greedy completion of each prompt."""
        g = self.cfg.group_size
        greedy = dataclasses.replace(self.sampling, temperature=0.0)
        completions = self.collector.generate(self.policy, [c.prompt_ids for c in exp.completions[::g]], greedy,
                                              [0] * (len(exp) // g))
        return self.collector.score(exp.records[::g], completions)

    def advantages(self, exp: Experience) -> None:
        signals.advantages(exp, self.cfg, self.estimator.meta["output"], self.wants, self._baseline)

    # ----- update: the loss of one micro-batch -----
    def micro_loss(self, exp: Experience, rows: Tensor, totals: Totals, sums: dict, loop: Loop) -> Tensor:
        cfg, mask = self.cfg, exp.mask[rows]
        aggregate = AGGREGATIONS.get(cfg.aggregation).fn
        with loop.autocast():
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
        ratio = terms.ratio.detach() * mask
        sums["policy_loss"] += float(policy_loss.detach())
        sums["entropy"] += float((out.entropy.detach() * mask).sum())
        sums["clipped"] += float(terms.clipped.sum())
        sums["dual_clipped"] += float(terms.dual_clipped.sum())
        sums["ratio"] += float(ratio.sum())
        sums["ratio_max"] = max(sums["ratio_max"], float(ratio.max()))
        sums["ratio_min"] = min(sums.get("ratio_min", math.inf), float(terms.ratio[mask.bool()].min()))
        return loss

    def mini_batches(self, n: int, epoch: int) -> list[Tensor]:
        """This rank's rows of each mini-batch, in the epoch's seeded order (see the module docstring)."""
        m = self.cfg.mini_batches
        global_rows = torch.arange(n) + distributed.rank() * n
        order = list(range(m))
        random.Random((self.seed * 1_000_003 + self.step) * 101 + epoch).shuffle(order)
        return [torch.nonzero(global_rows % m == k).flatten() for k in order]

    def _totals(self, exp: Experience, rows: Tensor) -> Totals:
        local = Totals.of(exp.mask[rows], self.sampling.max_new_tokens)
        sums = distributed.reduce_sums({"tokens": local.tokens, "sequences": local.sequences})
        return Totals(int(sums["tokens"]), int(sums["sequences"]), local.max_length)

    def update(self, exp: Experience, loop: Loop) -> dict:
        sums, grad_norms = defaultdict(float), []
        for epoch in range(self.cfg.ppo_epochs):
            for mini in self.mini_batches(len(exp), epoch):
                totals = self._totals(exp, mini)
                for rows in mini.split(self._micro(len(exp))):
                    loop.backward(self.micro_loss(exp, rows, totals, sums, loop))
                grad_norms.append(loop.apply_gradients())
        return self._update_metrics(exp, sums, grad_norms)

    def _update_metrics(self, exp: Experience, sums: dict, grad_norms: list[float]) -> dict:
        extremes = torch.tensor([sums["ratio_max"], -sums.get("ratio_min", 1.0)])
        ratio_max, neg_min = distributed.all_reduce(extremes, "max").tolist()
        sums = distributed.reduce_sums({**{k: v for k, v in sums.items() if not k.startswith("ratio_m")},
                                        "tokens": float(exp.mask.sum())})
        tokens = sums["tokens"] * self.cfg.ppo_epochs
        out = {"loss/policy": sums["policy_loss"] / self._updates_per_step(),
               "entropy": sums["entropy"] / tokens, "clip_fraction": sums["clipped"] / tokens,
               "dual_clip_fraction": sums["dual_clipped"] / tokens, "ratio/mean": sums["ratio"] / tokens,
               "ratio/max": ratio_max, "ratio/min": -neg_min,
               "grad_norm": sum(grad_norms) / max(len(grad_norms), 1)}
        if self.reference is not None:
            out["kl"] = sums["kl"] / tokens
        if exp.old_values is not None:
            out["loss/value"] = sums["value_loss"] / self._updates_per_step()
        return out

    # ----- one step -----
    def collect(self, timer: PhaseTimer) -> tuple[Experience, dict]:
        return self.collector.collect(self.policy, self.step, timer)

    def train_step(self, loop: Loop) -> dict:
        self.step = loop.step
        timer, started = PhaseTimer(), time.perf_counter()
        counts = self._source_counts()
        exp, sampling = self.collect(timer)
        scored = distributed.reduce_sums({key: value - counts[key] for key, value in self._source_counts().items()})
        self._check_failures(scored, loop)
        if exp.rewards is None and exp.preferences is None:
            loop.log({"step": self.step + 1, "event": "no_varied_groups"})
            return {**sampling, **self._phase_metrics(timer, started, 0)}
        with timer("reference"):
            self.reference_pass(exp, loop)
        with timer("advantage"):
            self.advantages(exp)
        with timer("update"):
            metrics = self.update(exp, loop)
        with timer("sync"):
            self.generator.sync_weights(self.policy)
        metrics.update(sampling)
        metrics.update(self._signal_metrics(exp))
        metrics.update(scored)
        tokens = distributed.reduce_sums({"n": sum(len(c) for c in exp.completions)})["n"]
        metrics.update(self._phase_metrics(timer, started, int(tokens)))
        return metrics

    def signal_source(self):
        """("judge" | "reward", the source of the training signal)."""
        return ("judge", self.judge) if "preferences" in self.wants else ("reward", self.reward)

    def _check_failures(self, scored: dict, loop: Loop) -> None:
        """Stop before training on a step whose scores mostly failed (`rl.max_failure_rate`), weights saved."""
        if self.signal_source() is None:
            return
        kind, source = self.signal_source()
        failed, items = scored[f"{kind}/failures"], scored[f"{kind}/items"]
        if items and failed / items > self.cfg.max_failure_rate:
            saved = loop.save()
            first = "; ".join(source.stats.examples[:3]) or "no message kept"
            raise RewardFailureError(
                f"{failed:.0f} of {items:.0f} {kind} scores failed at step {self.step + 1}, more than "
                f"rl.max_failure_rate={self.cfg.max_failure_rate:g}; first errors: {first}. The weights before "
                f"this step are saved in {saved}; fix the {kind} and resume, or raise rl.max_failure_rate.")

    def _source_counts(self) -> dict:
        """Cumulative calls, scored items (pairs for a judge) and failures of the signal's source."""
        if self.signal_source() is None:
            return {}
        kind, source = self.signal_source()
        stats = source.stats
        return {f"{kind}/calls": stats.calls, f"{kind}/items": stats.items, f"{kind}/failures": stats.failures}

    def _signal_metrics(self, exp: Experience) -> dict:
        lengths = _everyone(exp.mask.sum(1))
        valid = _everyone(exp.advantages[exp.mask.bool()])
        truncated = _everyone(torch.tensor([float(c.finish_reason == "length") for c in exp.completions]))
        out = {"response_length/mean": float(lengths.mean()), "response_length/max": float(lengths.max()),
               "truncated": float(truncated.mean()),
               "advantage/mean": float(valid.mean()), "advantage/std": float(valid.std()) if len(valid) > 1 else 0.0,
               "advantage/min": float(valid.min()), "advantage/max": float(valid.max())}
        if exp.rewards is not None:
            rewards = _everyone(exp.rewards)
            out.update({"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std())})
        if exp.preferences is not None:
            out["preference/abs_mean"] = float(_everyone(exp.preferences).abs().mean())
        if hasattr(self.judge, "metrics"):  # the router: strong-judge calls and their share, cumulative
            out.update(distributed.reduce_sums(self.judge.metrics("router")))
        return out

    @staticmethod
    def _phase_metrics(timer: PhaseTimer, started: float, tokens: int) -> dict:
        elapsed = time.perf_counter() - started
        out = {f"time/{phase}": seconds for phase, seconds in timer.seconds.items()}
        out.update({"time/step": elapsed, "tokens_per_s": tokens / elapsed})
        return out

    # ----- evaluation: held-out prompts, greedy and sampled, scored by the eval reward -----
    def _eval_reward_of(self, sampling: SamplingConfig, salt: int) -> tuple[float, float]:
        n = len(self.eval_prompts)
        positions = _padded_share(n)
        seeds = [sampling_seed(self.seed, 0, salt, k) for k in positions]
        completions = self.collector.generate(self.policy, [self.eval_prompts[k % n].prompt for k in positions],
                                              sampling, seeds)
        real = [(k, c) for k, c in zip(positions, completions, strict=True) if k < n]
        scores = score_completions(self.eval_reward, [self.eval_records[k] for k, _ in real],
                                   [c for _, c in real]) if real else None
        sums = distributed.reduce_sums({"reward": float(scores.values.float().sum()) if real else 0.0,
                                        "length": float(sum(len(c) for _, c in real))})
        return sums["reward"] / n, sums["length"] / n

    @torch.no_grad()
    def evaluate(self, loop: Loop | None = None) -> dict:
        """Mean eval reward of greedy completions, and of one sample per prompt at the training temperature
        (seeded the same at every evaluation)."""
        if not self.eval_prompts or self.eval_reward is None:
            return {}
        greedy, length = self._eval_reward_of(dataclasses.replace(self.sampling, temperature=0.0), 1)
        sampled, _ = self._eval_reward_of(self.sampling, 2)
        return {"eval/reward": greedy, "eval/sampled_reward": sampled, "eval/response_length": length}

    def after_training(self, loop: Loop) -> dict:
        return {}

    # ----- state -----
    def state_dict(self) -> dict:
        state = {"cursor": self.collector.cursor}
        for name, part in (("reward", self.reward), ("judge", self.judge)):
            if part is not None and hasattr(part, "state_dict"):
                state[name] = part.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.collector.cursor = state["cursor"]
        for name in ("reward", "judge"):
            if name in state:
                getattr(self, name).load_state_dict(state[name])

    def export(self, path: Path, loop: Loop) -> None:
        export_model(self.policy, self.tokenizer, path, merge_lora=loop.cfg.merge_lora)


def _everyone(values: Tensor) -> Tensor:
    """`values` of every rank, flattened and concatenated (for metrics)."""
    return torch.cat([v.flatten() for v in distributed.gather_objects(values.detach().float().cpu())])


def _padded_share(n: int) -> list[int]:
    """This rank's positions of n items padded to a multiple of the world size (positions >= n are padding)."""
    world = distributed.world_size()
    return distributed.shard_of(list(range(-(-n // world) * world)))
