"""Self-improvement loops in the one training loop: sample, judge, build comparisons, train.

A round samples G answers for each of its prompts (from the policy, the fixed reference, or the
policy and Nash-MD's geometric mixture), ranks them with the run's reward source or pairwise judge
(or, for CREAM, with the iterate's own implicit reward), turns each group into comparisons by a named
rule (`PAIR_RULES`) and trains `steps_per_round` optimizer steps on the set with a registered loss
(`COMPARISON_LOSSES` or any paired loss). `steps_per_round = 1` is the online form (fresh
comparisons every step, Guo et al. arXiv 2402.04792); more is the iterative form (rounds of
generate, judge, train). A set stores the log-probs of each answer under the reference and under the
round's starting policy pi_t, computed when it is built: a loss against pi_t needs no copy of pi_t,
and a run killed mid-round resumes on the same set (it is part of the checkpoint).

Under torchrun each rank samples and judges its share of a round's prompts; the set is gathered on
every rank in prompt order, and each step's slice is padded with zero-weight copies to split evenly.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
from dataclasses import dataclass, field

import torch
from torch import Tensor

from alignkit import distributed
from alignkit.algorithms.selfplay import ComparisonInputs, comparison_loss, loss_entry
from alignkit.data.tokenize import Encoded
from alignkit.models.logprobs import completion_logprobs
from alignkit.rollout.hf import TransformersGenerator
from alignkit.rollout.mixture import GeometricMixture
from alignkit.train.experience import PhaseTimer, sampling_seed, score_completions
from alignkit.train.loop import Loop
from alignkit.train.online import OnlineMethod
from alignkit.train.pairs import PAIR_RULES, Comparison, JudgedGroup, win_matrix

SAMPLERS = ("policy", "reference", "mixture")
REFERENCES = ("initial", "round")
CONSISTENCY = ("none", "avg", "dyn")


@dataclass
class ComparisonConfig:
    """`comparisons.*`: what a self-improvement loop samples, how it builds comparisons, what it trains."""

    loss: str = "dpo"               # a comparison loss (dno, sppo, inpo, cream, nash-md, sft) or any paired loss
    loss_options: dict = field(default_factory=dict)   # e.g. {beta: 0.1}
    rule: str = "best-worst"        # how a group of judged answers becomes comparisons
    rule_options: dict = field(default_factory=dict)   # e.g. {min_margin: 0.5}
    steps_per_round: int = 1        # 1: online (fresh comparisons every step); N: iterative rounds of N steps
    epochs: int = 1                 # passes over a round's comparisons (its prompts: steps x prompts_per_step / epochs)
    reference: str = "initial"      # log-probs the loss compares against: the initial policy, or pi_t of the round
    sampler: str = "policy"         # "policy", "reference" (the fixed initial policy), "mixture" (Nash-MD)
    mixture_coef: float = 0.5       # Nash-MD: the reference's weight in the geometric mixture
    ranking: str = "source"         # "source" (reward or judge) or "implicit" (the iterate's DPO reward, CREAM)
    consistency: str = "none"       # CREAM: "avg" or "dyn" Kendall consistency with the previous ranking

    RANGES = {"steps_per_round": (1, None), "epochs": (1, None), "mixture_coef": (0, 1)}
    CHOICES = {"rule": PAIR_RULES.names, "sampler": SAMPLERS, "reference": REFERENCES,
               "ranking": ("source", "implicit"), "consistency": CONSISTENCY}


def reads_initial(c: ComparisonConfig) -> bool:
    """Whether a loop needs the initial policy: it samples from it, or its loss compares against it."""
    loss = loss_entry(c.loss)
    reads = loss.meta.get("reference", True) and (c.reference == "initial" or c.loss == "inpo")
    return reads or c.sampler in ("reference", "mixture")


def kendall_consistency(current: Tensor, previous: Tensor) -> float:
    """(tau + 1) / 2 of two rankings of the same answers (CREAM, arXiv 2410.12735): 1 when they agree."""
    i, j = torch.triu_indices(len(current), len(current), 1)
    agree = torch.sign(current[i] - current[j]) * torch.sign(previous[i] - previous[j])
    return (float(agree.mean()) + 1) / 2 if len(i) else 1.0


class ComparisonMethod(OnlineMethod):
    """The comparison set of a round, its log-probs, and the steps that train on it."""

    def __init__(self, *args, comparisons: ComparisonConfig, encoder, reference=None, iterates=(), **kwargs):
        self.comparisons, self.encoder, self.initial = comparisons, encoder, reference
        self.loss, self.rule = loss_entry(comparisons.loss), PAIR_RULES.get(comparisons.rule)
        super().__init__(*args, reference=reference, **kwargs)
        self.iterates = list(iterates)          # pi_{t-1}, pi_{t-2}: frozen copies for the implicit ranking
        self.round, self.items, self.round_stats = -1, [], {}
        self.alternative = (GeometricMixture(self.policy, self.initial, comparisons.mixture_coef)
                            if comparisons.sampler == "mixture" else None)

    # ----- set-up -----
    def _check(self, reward, judge) -> None:
        c, kind = self.comparisons, self.rule.meta["kind"]
        loss_kind = self.loss_kind()
        if kind != loss_kind:
            raise ValueError(f"comparisons.rule={c.rule} makes {kind} comparisons; comparisons.loss={c.loss} trains on "
                             f"{loss_kind}s")
        if self.rule.meta["needs"] == "scores" and c.ranking == "source" and reward is None and judge is None:
            raise ValueError(f"comparisons.rule={c.rule} ranks answers: give a reward source or a judge")
        if reads_initial(c) and self.initial is None:
            raise ValueError("this loop needs the initial policy as a frozen reference")
        if (c.sampler == "mixture") != (c.rule == "against-alternative"):
            raise ValueError("comparisons.sampler=mixture goes with comparisons.rule=against-alternative (Nash-MD)")
        if (c.steps_per_round * self.cfg.prompts_per_step) % (c.epochs * distributed.world_size()):
            raise ValueError("comparisons.steps_per_round x rl.prompts_per_step must split into comparisons.epochs "
                             "passes over prompts shared evenly by the ranks")

    def loss_kind(self) -> str:
        return self.loss.meta.get("kind", "pair")

    def _reference(self, reference):
        return None   # OnlineMethod's KL reference: this loop keeps its own (self.initial)

    def prepare(self, loop: Loop, resuming: bool) -> None:
        self.loop = loop
        super().prepare(loop, resuming)

    def modules(self) -> dict:
        return {"policy": self.policy, **{f"iterate{k + 1}": m for k, m in enumerate(self.iterates)}}

    @property
    def round_prompts(self) -> int:
        c = self.comparisons
        return c.steps_per_round * self.cfg.prompts_per_step // c.epochs

    # ----- a round: sample, judge, build, log-probs -----
    def _sample(self, ids: list[int], salt: int, generator, timer: PhaseTimer):
        g = self.cfg.group_size
        seeds = [sampling_seed(self.seed, self.round, salt, k * g + j) for k in ids for j in range(g)]
        prompts = [self.collector.prompts[i].prompt for i in ids for _ in range(g)]
        with timer("generate"):
            return self.collector.generate(self.policy, prompts, self.sampling, seeds, generator)

    def _generator(self, model):
        """A rollout engine on `model` (the fixed reference, Nash-MD's mixture) next to the policy's."""
        if not isinstance(self.generator, TransformersGenerator):
            raise ValueError("sampling from the reference or the mixture needs rollout.backend=transformers")
        return TransformersGenerator(model, self.tokenizer)

    def build_round(self, timer: PhaseTimer) -> dict:
        """This round's comparisons on every rank, and its statistics."""
        everyone = self.collector.next_prompts(self.round_prompts)
        positions = distributed.shard_of(list(range(self.round_prompts)))
        ids = [everyone[k] for k in positions]
        engine = self._generator(self.initial) if self.comparisons.sampler == "reference" else self.generator
        completions = self._sample(ids, 0, engine, timer)
        g = self.cfg.group_size
        records = [self.collector.records[i] for i in ids]
        groups = [JudgedGroup(self.collector.prompts[i].prompt, [c.token_ids for c in completions[k * g:(k + 1) * g]])
                  for k, i in enumerate(ids)]
        if self.rule.meta["needs"] == "reference" or self.comparisons.rule_options.get("include_reference"):
            self._attach_references(groups, records)
        before = self._source_counts()
        with timer("score"):
            if self.alternative is not None:
                alternatives = self._sample(ids, 1, self._generator(self.alternative), timer)
                self._judge_alternatives(groups, records, completions, alternatives)
            elif self.comparisons.ranking == "implicit":
                self._rank_by_implicit_reward(groups)
            elif self.rule.meta["needs"] == "scores":
                self._judge(groups, records, completions)
        scored = distributed.reduce_sums({k: v - before[k] for k, v in self._source_counts().items()})
        self._check_failures(scored, self.loop)
        mine = [self._build(group, random.Random(sampling_seed(self.seed, self.round, 2, k)))
                for k, group in zip(positions, groups, strict=True)]
        with timer("reference"):
            flat = [item for items in mine for item in items]
            self._fill_logprobs(flat)
        self.items = [item for part in distributed.gather_objects(flat) for item in part]
        self._advance_iterates()
        kept = distributed.reduce_sums({"prompts_with_comparisons": sum(bool(items) for items in mine)})
        return {**scored, "round": self.round, "comparisons": len(self.items),
                "prompts_without_comparisons": self.round_prompts - kept["prompts_with_comparisons"],
                "comparison/gap_mean": _mean([item.gap for item in self.items]),
                **self._consistency(groups), **self._cache_hits()}

    def _build(self, group: JudgedGroup, rng: random.Random) -> list[Comparison]:
        if not group.answers:   # every score failed
            return []
        items = PAIR_RULES.call(self.comparisons.rule, group, rng, **self.comparisons.rule_options)
        if self.comparisons.consistency != "none":
            for item in items:
                item.chosen_target, item.rejected_target = group.consistency, 1 - group.consistency
        return items

    def _attach_references(self, groups: list[JudgedGroup], records) -> None:
        for group, record in zip(groups, records, strict=True):
            if record.reference is not None:
                group.reference = self.encoder.encode(record.prompt, record.reference).completion

    def _judge(self, groups: list[JudgedGroup], records, completions) -> None:
        """Scores [G] and win matrix [G, G] of every group: from a reward source, or one judge call per pair."""
        g = self.cfg.group_size
        expanded = [r for r in records for _ in range(g)]
        if self.reward is not None:
            scored = score_completions(self.reward, expanded, completions)
            failed = scored.failure_mask().cpu().view(-1, g)
            for group, row, lost in zip(groups, scored.values.float().cpu().view(-1, g), failed, strict=True):
                group.scores, group.wins = row, win_matrix(row)
                if lost.any():
                    group.drop(lost)
            self._score_references(groups, records)
            return
        pairs = [(i, j) for i in range(g) for j in range(i + 1, g)]
        prompts = [r.prompt for r in records for _ in pairs]
        texts = [c.text for c in completions]
        a = [texts[k * g + i] for k in range(len(groups)) for i, _ in pairs]
        b = [texts[k * g + j] for k in range(len(groups)) for _, j in pairs]
        probs = self.judge.compare(prompts, a, b).probs.float().cpu().view(len(groups), len(pairs)) if pairs else None
        for k, group in enumerate(groups):
            wins = torch.full((g, g), 0.5)
            for (i, j), p in zip(pairs, probs[k] if probs is not None else [], strict=True):
                wins[i, j], wins[j, i] = p, 1 - p
            group.wins, group.scores = wins, wins.mean(1)

    def _score_references(self, groups: list[JudgedGroup], records) -> None:
        with_reference = [(group, record) for group, record in zip(groups, records, strict=True)
                          if group.reference is not None]
        if not with_reference:
            return
        texts = [record.reference for _, record in with_reference]
        values = self.reward.score([r.prompt for _, r in with_reference], texts,
                                   [r.reference for _, r in with_reference]).values.float().cpu()
        for (group, _), value in zip(with_reference, values.tolist(), strict=True):
            group.reference_score = value

    def _judge_alternatives(self, groups, records, completions, alternatives) -> None:
        """Nash-MD: P(policy sample beats the mixture's sample) per answer, by the judge or Bradley-Terry."""
        g = self.cfg.group_size
        prompts = [r.prompt for r in records for _ in range(g)]
        if self.judge is not None:
            probs = self.judge.compare(prompts, [c.text for c in completions], [c.text for c in alternatives]).probs
        else:
            expanded = [r for r in records for _ in range(g)]
            scores = score_completions(self.reward, expanded + expanded, list(completions) + list(alternatives))
            values = scores.values.float()
            probs = torch.sigmoid(values[:len(completions)] - values[len(completions):])
        for k, group in enumerate(groups):
            group.alternatives = [c.token_ids for c in alternatives[k * g:(k + 1) * g]]
            group.alternative_wins = probs.float().cpu()[k * g:(k + 1) * g]

    def _rank_by_implicit_reward(self, groups: list[JudgedGroup]) -> None:
        """CREAM's self-reward: r_t = log pi_t - log pi_{t-1}, and the previous iterate's own ranking
        r_{t-1} = log pi_{t-1} - log pi_{t-2}; an iterate with no predecessor ranks by its length-normalised
        log-likelihood (the paper's choice for the SFT model). Consistency is 1 in the first round."""
        answers = [Encoded(group.prompt, answer) for group in groups for answer in group.answers]
        models = [self.policy] + self.iterates[:max(0, self.round)]
        logps = [self._logprobs(model, answers) for model in models[:3]]
        lengths = torch.tensor([max(len(a.completion), 1) for a in answers], dtype=torch.float32)

        def reward(k: int) -> Tensor:   # the ranking of the iterate k rounds back
            return logps[k] - logps[k + 1] if k + 1 < len(logps) else logps[k] / lengths

        current = reward(0).view(len(groups), -1)
        previous = reward(1).view(len(groups), -1) if len(logps) > 1 else None
        per_group = [kendall_consistency(c, p) if previous is not None else 1.0
                     for c, p in zip(current, previous if previous is not None else current, strict=True)]
        shared = _mean(_everyone(per_group)) if self.comparisons.consistency == "avg" else None
        for group, row, c in zip(groups, current, per_group, strict=True):
            group.scores, group.wins = row, win_matrix(row)
            group.consistency = shared if shared is not None else c

    def _advance_iterates(self) -> None:
        """Shift pi_t into the kept iterates: iterate1 <- policy, iterate2 <- iterate1, ..."""
        for k in range(len(self.iterates) - 1, -1, -1):
            source = self.policy if k == 0 else self.iterates[k - 1]
            self.iterates[k].load_state_dict(source.state_dict())

    @torch.no_grad()
    def _logprobs(self, model, encoded: list[Encoded]) -> Tensor:
        """Summed completion log-probs of `encoded` under `model`, in micro-batches; every rank makes as many
        forward calls (the largest count over ranks), as FSDP2 needs."""
        size = self.micro_batch_size or 16
        calls = int(distributed.all_reduce(torch.tensor(math.ceil(len(encoded) / size)), "max"))
        parts, was_training = [], model.training
        model.eval()
        for k in range(calls):
            chunk = encoded[k * size:(k + 1) * size]
            with self.loop.autocast():
                logps, _ = completion_logprobs(model, chunk or encoded[:1] or [Encoded([0], [0])], self.pad_id)
            parts.append(logps.float().cpu()[:len(chunk)])
        model.train(was_training)
        return torch.cat(parts) if parts else torch.zeros(0)

    def _fill_logprobs(self, items: list[Comparison]) -> None:
        """Each answer's summed log-probs under pi_t (the policy now) and, when read, the initial policy."""
        sides = ["chosen"] + (["rejected"] if self.loss_kind() == "pair" else [])
        encoded = [Encoded(item.prompt, getattr(item, side)) for side in sides for item in items]
        models = {"anchor": self.policy}
        if self.initial is not None and reads_initial(self.comparisons):
            models["initial"] = self.initial
        for name, model in models.items():
            values = self._logprobs(model, encoded).view(len(sides), len(items)) if items else None
            for k, item in enumerate(items):
                item.logps[name] = values[:, k].tolist() if values is not None else []
        for item in items:
            item.logps["reference"] = item.logps["anchor" if self.comparisons.reference == "round" else "initial"] \
                if self.loss.meta.get("reference", True) else []

    def signal_source(self):
        """("judge" | "reward", the source whose failures a round counts), or None for rules that judge nothing."""
        if self.rule.meta["needs"] == "reference" or self.comparisons.ranking == "implicit":
            return None
        return ("judge", self.judge) if self.judge is not None else ("reward", self.reward)

    def _consistency(self, groups: list[JudgedGroup]) -> dict:
        """CREAM: the mean ranking consistency C of the round's groups (1 when there is no previous ranking)."""
        if self.comparisons.consistency == "none":
            return {}
        return {"comparison/consistency": _mean(_everyone([group.consistency for group in groups]))}

    def _cache_hits(self) -> dict:
        source = self.judge if self.judge is not None else self.reward
        hits = getattr(getattr(source, "backend", None), "cache_hits", None)
        return distributed.reduce_sums({"judge/cache_hits": hits}) if hits is not None else {}

    # ----- a step: its slice of the set -----
    def step_items(self) -> list[Comparison]:
        """The comparisons of this step of the round: the set in a seeded order per epoch, cut into steps."""
        c, n = self.comparisons, len(self.items)
        order = []
        for epoch in range(c.epochs):
            ids = list(range(n))
            random.Random((self.seed * 1_000_003 + self.round) * 31 + epoch).shuffle(ids)
            order += ids
        k = self.step % c.steps_per_round
        start, end = len(order) * k // c.steps_per_round, len(order) * (k + 1) // c.steps_per_round
        return [self.items[i] for i in order[start:end]]

    def train_step(self, loop: Loop) -> dict:
        self.step, self.loop, timer = loop.step, loop, PhaseTimer()
        metrics = {}
        if self.step % self.comparisons.steps_per_round == 0 and self.round < self.step // \
                self.comparisons.steps_per_round:
            self.round = self.step // self.comparisons.steps_per_round
            self.round_stats = self.build_round(timer)
            metrics.update(self.round_stats)
            self.generator.sync_weights(self.policy)
        items = self.step_items()
        if not items:
            loop.log({"step": self.step + 1, "event": "no_comparisons", "round": self.round})
            return metrics
        with timer("update"):
            metrics.update(self.update_on(items, loop))
        self.generator.sync_weights(self.policy)
        metrics.update({f"time/{phase}": seconds for phase, seconds in timer.seconds.items()})
        return metrics

    def update_on(self, items: list[Comparison], loop: Loop) -> dict:
        """One optimizer step on `items` (the same list on every rank): the loss summed over this rank's share,
        divided by the number of comparisons of the whole step."""
        world = distributed.world_size()
        padded = items + [None] * (-len(items) % world)
        mine = distributed.shard_of(padded)
        size = self.micro_batch_size or len(mine)
        sums = {"loss": 0.0, "margin": 0.0, "accuracy": 0.0}
        for start in range(0, len(mine), size):
            chunk = mine[start:start + size]
            loss, parts = self._micro_loss(chunk, loop)
            loop.backward(loss / len(items))
            for key, value in parts.items():
                sums[key] += value
        grad_norm = loop.apply_gradients()
        totals = distributed.reduce_sums(sums)
        return {**{f"comparison/{k}": v / len(items) for k, v in totals.items()}, "grad_norm": grad_norm}

    def _micro_loss(self, chunk: list[Comparison | None], loop: Loop) -> tuple[Tensor, dict]:
        real = torch.tensor([item is not None for item in chunk], dtype=torch.float32)
        filled = [item if item is not None else self.items[0] for item in chunk]   # padding: weight 0
        pair = self.loss_kind() == "pair"
        encoded = [Encoded(i.prompt, i.chosen) for i in filled] + \
            ([Encoded(i.prompt, i.rejected) for i in filled] if pair else [])
        with loop.autocast():
            logps, lengths = completion_logprobs(self.policy, encoded, self.pad_id)
        logps, n = logps.float(), len(filled)
        inputs = self._inputs(filled, logps, lengths, n, pair)
        losses = comparison_loss(self.comparisons.loss, inputs, **self.comparisons.loss_options)
        margin = (inputs.lp_w - inputs.lp_l).detach().cpu() if pair else inputs.lp_w.detach().cpu()
        weighted = losses * real.to(losses.device)
        return weighted.sum(), {
            "loss": float(weighted.detach().sum()), "margin": float((margin * real).sum()),
            "accuracy": float(((margin > 0).float() * real).sum()) if pair else 0.0}

    def _inputs(self, items: list[Comparison], logps: Tensor, lengths: Tensor, n: int, pair: bool):
        def column(name: str, side: int):
            values = [item.logps.get(name) for item in items]
            return torch.tensor([v[side] for v in values], device=logps.device) if all(values) else None

        lp_l = logps[n:] if pair else torch.zeros_like(logps[:n])
        return ComparisonInputs(
            logps[:n], lp_l, column("reference", 0), column("reference", 1) if pair else None,
            lengths[:n], lengths[n:] if pair else None,
            anchor_chosen_logps=column("anchor", 0), anchor_rejected_logps=column("anchor", 1) if pair else None,
            chosen_targets=torch.tensor([i.chosen_target for i in items], device=logps.device),
            rejected_targets=torch.tensor([i.rejected_target for i in items], device=logps.device))

    # ----- state -----
    def state_dict(self) -> dict:
        return {**super().state_dict(), "round": self.round, "items": [dataclasses.asdict(i) for i in self.items]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.round, self.items = state["round"], [Comparison(**item) for item in state["items"]]


def frozen_copies(model, count: int) -> list:
    return [copy.deepcopy(model).eval().requires_grad_(False) for _ in range(count)]


def _everyone(values: list[float]) -> list[float]:
    return [v for part in distributed.gather_objects(values) for v in part]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
