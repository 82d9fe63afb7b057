"""Training objectives: how one micro-batch of examples becomes a summed loss.

An objective owns its tokenized examples (per split), the cached reference log-probs, and any
loss state (BCO's running reward shift, R3M's per-pair outliers). The trainer divides each
micro-batch's summed loss by `count(step_examples)`, the normaliser of the whole optimizer step,
so gradient accumulation reproduces the full-batch gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from alignkit import distributed
from alignkit.algorithms import (
    PAIRWISE_LOSSES,
    PREFERENCE_LOSSES,
    REWARD_LOSSES,
    UNPAIRED_LOSSES,
    kto_reference_point,
    needs_reference,
    normalize_config,
    pairwise_loss,
    preference_loss,
    r3m_delta,
    reward_loss,
    sft_loss,
    unpaired_loss,
)
from alignkit.data.tokenize import Encoded, collate
from alignkit.models.logprobs import completion_logprobs, reward_head_scores, token_logprobs
from alignkit.models.pairwise import pair_logits
from alignkit.registry import Registry

OBJECTIVES = Registry("objective")


@dataclass(frozen=True)
class PairExample:
    chosen: Encoded
    rejected: Encoded
    index: int = 0     # the record's index in its source
    origin: str = ""   # file:line of the record, for reports
    margin: float | None = None

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


@dataclass(frozen=True)
class ComparisonExample:
    """A comparison as a pairwise preference model reads it, in both orders."""

    forward: Encoded   # (prompt, chosen, rejected)
    swapped: Encoded   # (prompt, rejected, chosen)
    label: float = 1.0  # P(first answer better) of `forward`: 1, 1/2 (tie) or 0
    margin: float | None = None
    index: int = 0
    origin: str = ""

    def __len__(self) -> int:
        return len(self.forward) + len(self.swapped)


@dataclass(frozen=True)
class RatedExample:
    encoded: Encoded
    label: bool
    max_length: int | None = None  # the encoder's limit, which a mismatched pair with this prompt is cut to

    def __len__(self) -> int:
        return len(self.encoded)


@dataclass(frozen=True)
class MismatchedPair:
    """The prompt of example `prompt_of` with the completion of example `completion_of`, both of one split:
    one sample of KTO's KL estimate (Ethayarajh et al. 2024, arXiv 2402.01306)."""

    prompt_of: int
    completion_of: int
    encoded: Encoded

    def __len__(self) -> int:
        return len(self.encoded)


def shift_to_other_prompts(ids: list[int], prompts: list[int]) -> list[tuple[int, int]]:
    """KTO's mismatched pairs of one batch, as (prompt of, completion of), one per position of `ids`.

    Ethayarajh et al. 2024 (arXiv 2402.01306) shift the batch's completions by one; here each example's
    prompt takes the completion of the next example in the batch (cyclically) whose prompt is different,
    so neighbours that share a prompt never give a matched pair. `prompts[i]` names example i's prompt.
    A pure function of `ids`; empty when every example of the batch has the same prompt.
    """
    keys = [prompts[i] for i in ids]
    pairs = []
    for k, key in enumerate(keys):
        shift = next((s for s in range(1, len(ids)) if keys[(k + s) % len(ids)] != key), None)
        if shift is None:  # no other prompt here, so none anywhere in the batch
            return []
        pairs.append((ids[k], ids[(k + shift) % len(ids)]))
    return pairs


def prompt_groups(examples: list[RatedExample]) -> list[int]:
    """Example i's prompt as a small int, equal for equal prompt token ids (what the model sees)."""
    groups: dict[tuple[int, ...], int] = {}
    return [groups.setdefault(tuple(e.encoded.prompt), len(groups)) for e in examples]


class RunningShift:
    """BCO's reward shift delta: the running mean of every reward beta*h seen so far."""

    def __init__(self):
        self.total, self.count, self.pending = 0.0, 0, []

    @property
    def value(self) -> float:
        return self.total / self.count if self.count else 0.0

    def observe(self, rewards: Tensor) -> None:
        self.pending.append(rewards.detach().float().cpu())

    def end_step(self) -> None:
        """Fold in this step's rewards from every rank."""
        seen = torch.cat(self.pending) if self.pending else torch.zeros(0)
        step = distributed.reduce_sums({"total": seen.sum().item(), "count": seen.numel()})
        self.total += step["total"]
        self.count += int(step["count"])
        self.pending = []

    def state_dict(self) -> dict:
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.count = state["total"], state["count"]


class OutlierTable:
    """R3M's per-pair outlier variables delta_i, kept by position in the training split.

    A reward model with K heads keeps one delta per pair and head ([n_pairs, K]); its report
    gives the mean over heads, and flags a pair when any head does.
    """

    def __init__(self, pairs: list[PairExample]):
        self.pairs, self.delta = pairs, torch.zeros(len(pairs))
        self.pending: list[tuple[list[int], Tensor]] = []

    def update(self, ids: list[int], margin: Tensor, scale: float, lam: float) -> Tensor:
        delta = r3m_delta(margin, beta=scale, lam=lam)
        if self.delta.shape[1:] != delta.shape[1:]:
            self.delta = torch.zeros(len(self.pairs), *delta.shape[1:])
        self.pending.append((list(ids), delta.detach().cpu()))
        return delta

    def end_step(self) -> None:
        """Write this step's deltas from every rank into the table."""
        for pending in distributed.gather_objects(self.pending):
            for ids, delta in pending:
                self.delta[ids] = delta
        self.pending = []

    def write(self, run) -> dict:
        """The pairs with delta > 0, most suspicious first, to r3m_outliers.json."""
        delta = self.delta if self.delta.dim() == 1 else self.delta.mean(1)
        flagged = (delta > 0).nonzero().flatten().tolist()
        rows = sorted(({"index": self.pairs[i].index, "origin": self.pairs[i].origin,
                        "delta": float(delta[i])} for i in flagged), key=lambda r: -r["delta"])
        run.write_json("r3m_outliers.json", rows)
        return {"r3m/flagged": len(rows)}


class Objective:
    """Shared plumbing; subclasses define `count`, `loss_sum` and what reference they need.

    Methods that take `examples` get a list of (index within the split, example) pairs.
    """

    uses_reference = False

    def __init__(self, splits: dict[str, list], pad_id: int, options: dict):
        self.splits, self.pad_id, self.options = splits, pad_id, dict(options)
        self.reference: dict[str, Tensor] = {}
        self.loss_name = self.options.pop("name", None)
        self.shift = RunningShift() if self.loss_name == "bco" else None
        self.outliers: OutlierTable | None = None

    def count(self, examples: list) -> int:
        """The step's normaliser: examples here; completion tokens for SFT."""
        return len(examples)

    def step_stats(self, model, examples: list) -> dict:
        """Statistics of the whole optimizer step handed to every `loss_sum` of the step. `examples` is the
        whole step over all ranks; an objective scores this rank's share and combines the ranks' sums."""
        return {}

    def plan_steps(self, batch_indices: Callable[[int], list[int]], total_steps: int) -> None:
        """Called before the reference pass with `batch_indices(step)` (a step's example ids over all ranks)
        and the run's number of steps, for objectives whose reference depends on how steps group examples."""

    def end_step(self) -> None:
        for state in (self.shift, self.outliers):
            if state is not None:
                state.end_step()

    def state_dict(self) -> dict:
        state = {}
        if self.shift is not None:
            state["shift"] = self.shift.state_dict()
        if self.outliers is not None:
            state["outliers"] = self.outliers.delta.clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.shift is not None:
            self.shift.load_state_dict(state["shift"])
        if self.outliers is not None:
            self.outliers.delta = state["outliers"].clone()

    def reference_sequences(self, example) -> list[Encoded]:
        return []

    def write_reports(self, run) -> dict:
        """Write what the objective learned about the data into the run directory; return metrics."""
        return self.outliers.write(run) if self.outliers is not None else {}

    def after_training(self, model, micro_batches) -> dict:
        """Called once after the last step, before the final evaluation and save, with no gradient
        and the model in eval mode; `micro_batches` yields this rank's share of the training split as
        (micro-batch, real): a batch that is not real only keeps the ranks in step. Returns metrics."""
        return {}

    @torch.no_grad()
    def compute_reference(self, model, split: str, ids: list[int]) -> Tensor:
        """Reference log-probs of examples `ids` of a split: [len(ids), sequences per example]."""
        examples = self.splits[split]
        seqs = [s for i in ids for s in self.reference_sequences(examples[i])]
        lp, _ = completion_logprobs(model, seqs, self.pad_id)
        return lp.view(len(ids), -1).float().cpu()


@OBJECTIVES.register("sft", summary="negative log-likelihood of demonstrations")
class SFTObjective(Objective):
    def count(self, examples: list) -> int:
        return sum(len(e.completion) for _, e in examples)

    def loss_sum(self, model, examples: list, split: str, stats: dict, train: bool):
        batch = collate([e for _, e in examples], self.pad_id).to(next(model.parameters()).device)
        token_lp = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.score_mask)
        loss = sft_loss(token_lp, batch.score_mask)
        return loss, {"loss": loss.detach()}


@OBJECTIVES.register("paired", summary="offline preference losses on (prompt, chosen, rejected)")
class PairedObjective(Objective):
    def __init__(self, splits, pad_id, options):
        super().__init__(splits, pad_id, {"name": "dpo", **options})
        entry = PREFERENCE_LOSSES.get(self.loss_name)
        self.loss_config = normalize_config(self.options)
        self.uses_reference = needs_reference(self.loss_name, **self.loss_config)
        self.beta = float(self.loss_config.get("beta", entry.defaults().get("beta", 0.1)))
        self.outliers = OutlierTable(splits["train"]) if self.loss_name == "r3m_dpo" else None

    def reference_sequences(self, example: PairExample) -> list[Encoded]:
        return [example.chosen, example.rejected]

    def _extra_config(self, margin: Tensor, ids: list[int], train: bool) -> dict:
        if self.shift is not None:
            return {"delta": self.shift.value}
        if self.outliers is not None:
            lam = self.loss_config.get("lam", PREFERENCE_LOSSES.get("r3m_dpo").defaults()["lam"])
            if train:
                return {"delta": self.outliers.update(ids, margin, self.beta, lam)}
            return {"delta": r3m_delta(margin, beta=self.beta, lam=lam)}
        return {}

    def loss_sum(self, model, examples: list, split: str, stats: dict, train: bool):
        ids = [i for i, _ in examples]
        seqs = [s for _, e in examples for s in (e.chosen, e.rejected)]
        lp, lengths = completion_logprobs(model, seqs, self.pad_id)
        lp_w, lp_l, len_w, len_l = lp[0::2], lp[1::2], lengths[0::2], lengths[1::2]
        ref_w = ref_l = None
        if self.uses_reference:
            ref = self.reference[split][ids].to(lp.device)
            ref_w, ref_l = ref[:, 0], ref[:, 1]
        h_w, h_l = (lp_w - ref_w, lp_l - ref_l) if ref_w is not None else (lp_w, lp_l)
        margin = (h_w - h_l).detach()
        config = {**self.loss_config, **self._extra_config(margin, ids, train)}
        losses = preference_loss(self.loss_name, chosen_logps=lp_w, rejected_logps=lp_l,
                                 ref_chosen_logps=ref_w, ref_rejected_logps=ref_l,
                                 chosen_lengths=len_w, rejected_lengths=len_l, **config)
        if self.shift is not None and train:
            self.shift.observe(self.beta * torch.cat([h_w, h_l]))
        avg_w, avg_l = (lp_w / len_w.clamp(min=1)).detach(), (lp_l / len_l.clamp(min=1)).detach()
        metrics = {
            "loss": losses.detach().sum(),
            "reward_accuracy": (margin > 0).float().sum(),
            "reward_margin": self.beta * margin.sum(),
            "preference_accuracy": (avg_w > avg_l).float().sum(),
            "chosen_logps": lp_w.detach().sum(),
            "rejected_logps": lp_l.detach().sum(),
        }
        return losses.sum(), metrics


@OBJECTIVES.register("unpaired", summary="KTO / BCO on (prompt, completion, thumbs up/down)")
class UnpairedObjective(Objective):
    """KTO (Ethayarajh et al. 2024, arXiv 2402.01306) or BCO (Jung et al. 2024, arXiv 2404.04656).

    KTO's reference point z0 = max(0, mean log pi(y'|x) - log pi_ref(y'|x)) is taken, without gradient,
    over mismatched pairs drawn within each optimizer step: each example's prompt with the completion of
    the next example of the step whose prompt differs (`shift_to_other_prompts`), a pure function of the
    step's example ids, so resume and any world size draw the same pairs. The paper computes pi_ref of
    those pairs on the fly with the reference model in memory; here the reference leaves memory after
    the offline trainer's reference pass, so `plan_steps` lists the pairs of every step of every epoch
    the run reaches (the step ids are a pure function of (seed, step), and a resumed run reads its
    config back unchanged) and the pass caches their reference log-probs with the rest: the same
    numbers as the paper's, with no second model in memory. The pairs live in the extra split
    `"{split}.mismatched"` (`MismatchedPair`s). A step whose examples all share one prompt has no
    mismatched pair: its z0 is 0 (the floor of the clamp) and the `kl_unpaired` metric counts it.
    Evaluation pairs each held-out example once and for all (the same rule over the split in file order)
    and takes z0 over each eval micro-batch's pairs.
    """

    def __init__(self, splits, pad_id, options):
        super().__init__(dict(splits), pad_id, {"name": "kto", **options})
        entry = UNPAIRED_LOSSES.get(self.loss_name)
        self.loss_config = dict(self.options)
        self.beta = float(self.loss_config.get("beta", entry.defaults()["beta"]))
        self.uses_reference = True
        self.prompts = {split: prompt_groups(examples) for split, examples in splits.items()}
        self.pair_rows: dict[str, dict[tuple[int, int], int]] = {}
        self.eval_pairs: list[tuple[int, int]] = []
        if self.loss_name == "kto" and splits.get("eval"):
            self.eval_pairs = shift_to_other_prompts(list(range(len(splits["eval"]))), self.prompts["eval"])
            self._add_pairs("eval", self.eval_pairs)

    def reference_sequences(self, example: RatedExample | MismatchedPair) -> list[Encoded]:
        return [example.encoded]

    # ----- KTO's mismatched pairs -----
    def mismatched_pairs(self, ids: list[int], split: str = "train") -> list[tuple[int, int]]:
        """The mismatched pairs of a batch of `split`, (prompt of, completion of) per position of `ids`."""
        return shift_to_other_prompts(ids, self.prompts[split])

    def plan_steps(self, batch_indices: Callable[[int], list[int]], total_steps: int) -> None:
        """KTO: the pairs of every step of every epoch the run reaches, whose reference log-probs the
        reference pass then caches (whole epochs, so any step of them can be replayed)."""
        if self.loss_name != "kto":
            return
        n, size = len(self.splits["train"]), len(batch_indices(0))
        steps = math.ceil(math.ceil(total_steps * size / n) * n / size)
        self._add_pairs("train", [p for step in range(steps) for p in self.mismatched_pairs(batch_indices(step))])

    def _add_pairs(self, split: str, pairs: list[tuple[int, int]]) -> None:
        rows = self.pair_rows.setdefault(split, {})
        listed = self.splits.setdefault(f"{split}.mismatched", [])
        for pair in pairs:
            if pair not in rows:
                rows[pair] = len(listed)
                listed.append(self._pair(split, *pair))

    def _pair(self, split: str, i: int, j: int) -> MismatchedPair:
        """x_i with y_j as tokenized for example j (its trained-token mask too), cut as the encoder cuts to fit
        max_length after x_i."""
        own, other = self.splits[split][i], self.splits[split][j].encoded
        prompt = own.encoded.prompt
        room = None if own.max_length is None else own.max_length - len(prompt)
        mask = None if other.mask is None else other.mask[:room]
        return MismatchedPair(i, j, Encoded(prompt, other.completion[:room], mask))

    def _pair_reference(self, split: str, pairs: list[tuple[int, int]]) -> tuple[list[int], Tensor]:
        """Rows of `pairs` in the split's mismatched pairs, and their cached reference log-probs."""
        key, rows = f"{split}.mismatched", self.pair_rows.get(split, {})
        missing = [p for p in pairs if p not in rows]
        if missing:
            raise RuntimeError(f"KTO: mismatched pairs {missing[:3]} of {split!r} were not planned, so their "
                               "reference log-probs were never computed (see UnpairedObjective.plan_steps)")
        cached = self.reference.get(key)
        if cached is None or len(cached) != len(self.splits[key]):
            raise RuntimeError(f"the reference cache does not hold the {len(self.splits[key])} mismatched pairs "
                               f"of {split!r} (written before KTO drew them per step?): start a new run")
        ids = [rows[p] for p in pairs]
        return ids, cached[ids, 0]

    @torch.no_grad()
    def _kl_point(self, model, pairs: list[tuple[int, int]], split: str) -> Tensor:
        """z0 over every rank's `pairs` together: this rank scores its own, reduce_sums adds the ranks' sums."""
        kl = torch.zeros(0, device=next(model.parameters()).device)
        if pairs:
            rows, ref = self._pair_reference(split, pairs)
            seqs = [self.splits[f"{split}.mismatched"][r].encoded for r in rows]
            lp, _ = completion_logprobs(model, seqs, self.pad_id)
            kl = lp.float() - ref.to(lp.device)
        sums = distributed.reduce_sums({"kl": float(kl.sum()), "n": len(pairs)})
        if not sums["n"]:
            return kl.new_zeros(())
        return kto_reference_point(kl.new_tensor([sums["kl"] / sums["n"]]), kl.new_zeros(1))

    def _stats(self, model, examples: list, split: str) -> dict:
        """A micro-batch scored on its own (evaluation): KTO's z0 over the fixed pairs of its examples;
        BCO's running shift."""
        if self.loss_name == "kto":
            pairs = [self.eval_pairs[i] for i, _ in examples] if split == "eval" and self.eval_pairs else []
            return {"reference_point": self._kl_point(model, pairs, split), "kl_pairs": len(pairs)}
        return {"delta": self.shift.value} if self.shift is not None else {}

    def step_stats(self, model, examples: list) -> dict:
        """KTO: z0 over the mismatched pairs of the whole step (`examples`, over all ranks), this rank
        scoring the pairs of its own share; BCO: the running shift from before the step."""
        if self.loss_name != "kto":
            return self._stats(model, examples, "train")
        pairs = self.mismatched_pairs([i for i, _ in examples])
        return {"reference_point": self._kl_point(model, distributed.shard_of(pairs), "train"),
                "kl_pairs": len(pairs)}

    def loss_sum(self, model, examples: list, split: str, stats: dict, train: bool):
        ids = [i for i, _ in examples]
        lp, _ = completion_logprobs(model, [e.encoded for _, e in examples], self.pad_id)
        ref = self.reference[split][ids, 0].to(lp.device)
        labels = torch.tensor([e.label for _, e in examples], device=lp.device)
        stats = stats or self._stats(model, examples, split)
        config = {k: v for k, v in stats.items() if k != "kl_pairs"}
        losses = unpaired_loss(self.loss_name, logps=lp, ref_logps=ref, labels=labels,
                               **self.loss_config, **config)
        h = (lp - ref).detach()
        if self.shift is not None and train:
            self.shift.observe(self.beta * h)
        # The loss's own decision boundary: h above KTO's z0, or beta*h above BCO's shift.
        boundary = stats.get("reference_point", 0.0) * self.beta + stats.get("delta", 0.0)
        correct = ((self.beta * h - boundary) > 0) == labels
        metrics = {"loss": losses.detach().sum(), "label_accuracy": correct.float().sum(),
                   "reward": self.beta * h.sum()}
        if "kl_pairs" in stats:  # per example, so the step's mean is z0, and 1 on a step without pairs
            metrics["reference_point"] = float(stats["reference_point"]) * len(examples)
            metrics["kl_unpaired"] = 0.0 if stats["kl_pairs"] else float(len(examples))
        return losses.sum(), metrics


@OBJECTIVES.register("reward", summary="reward model on (prompt, chosen, rejected), one or K heads")
class RewardObjective(Objective):
    """Bradley-Terry or R3M per reward head, averaged over heads (model.heads=K shares one backbone)."""

    def __init__(self, splits, pad_id, options):
        super().__init__(splits, pad_id, {"name": "bradley_terry", **options})
        REWARD_LOSSES.get(self.loss_name)
        self.loss_config = normalize_config(self.options)
        self.outliers = OutlierTable(splits["train"]) if self.loss_name == "r3m" else None

    def loss_sum(self, model, examples: list, split: str, stats: dict, train: bool):
        ids = [i for i, _ in examples]
        seqs = [s for _, e in examples for s in (e.chosen, e.rejected)]
        scores = reward_head_scores(model, seqs, self.pad_id)  # [2n, K]
        scores = scores[:, 0] if scores.shape[1] == 1 else scores
        r_w, r_l = scores[0::2], scores[1::2]
        config = dict(self.loss_config)
        if self.outliers is not None and train:
            lam = config.get("lam", REWARD_LOSSES.get("r3m").defaults()["lam"])
            config["delta"] = self.outliers.update(ids, (r_w - r_l).detach(), 1.0, lam)
        margins = [e.margin for _, e in examples]
        margins = None if any(m is None for m in margins) else scores.new_tensor(margins)
        losses = reward_loss(self.loss_name, chosen_rewards=r_w, rejected_rewards=r_l, margins=margins, **config)
        return losses.sum(), self._metrics(losses, r_w.detach(), r_l.detach())

    @staticmethod
    def _metrics(losses: Tensor, r_w: Tensor, r_l: Tensor) -> dict:
        """Accuracy and margin of the heads' mean reward; `reward_std`, the spread across heads, with K > 1."""
        heads = r_w.dim() == 2
        mean_w, mean_l = (r_w.mean(1), r_l.mean(1)) if heads else (r_w, r_l)
        diff = mean_w - mean_l
        metrics = {"loss": losses.detach().sum(), "accuracy": (diff > 0).float().sum(), "margin": diff.sum(),
                   "chosen_reward": mean_w.sum(), "rejected_reward": mean_l.sum()}
        if heads:
            metrics["reward_std"] = (r_w.std(1, unbiased=False) + r_l.std(1, unbiased=False)).sum() / 2
        return metrics


@OBJECTIVES.register("pairwise", summary="pairwise preference model P(a > b) on both orders of each comparison")
class PairwiseObjective(Objective):
    """Weighted BCE on the logit g(x, a, b), each comparison trained in both orders in one batch
    (label l, then the swap with 1 - l), so the model learns to be symmetric (Xu et al. 2025,
    arXiv 2510.20369). After training, an SNGP head's posterior precision is accumulated."""

    def __init__(self, splits, pad_id, options):
        super().__init__(splits, pad_id, {"name": "bce", **options})
        PAIRWISE_LOSSES.get(self.loss_name)
        self.loss_config = normalize_config(self.options)

    def loss_sum(self, model, examples: list, split: str, stats: dict, train: bool):
        g = pair_logits(model, [s for _, e in examples for s in (e.forward, e.swapped)], self.pad_id)
        label = g.new_tensor([e.label for _, e in examples])
        margins = [e.margin for _, e in examples]
        margins = None if any(m is None for m in margins) else g.new_tensor(margins).repeat_interleave(2)
        labels = torch.stack([label, 1 - label], 1).flatten()
        losses = pairwise_loss(self.loss_name, logits=g, labels=labels, margins=margins, **self.loss_config)
        per_pair = losses.view(-1, 2).mean(1)  # the mean over both orders
        g_ab, g_ba = g.detach()[0::2], g.detach()[1::2]
        wins = (label > 0.5).float()
        metrics = {"loss": per_pair.detach().sum(), "accuracy": ((g_ab > 0).float() == wins).float().sum(),
                   "symmetric_accuracy": ((g_ab - g_ba > 0).float() == wins).float().sum(),
                   "logit": g_ab.sum()}
        return per_pair.sum(), metrics

    def after_training(self, model, micro_batches) -> dict:
        """SNGP's frozen pass: P = ridge I + sum phi phi^T over both orders of every training comparison."""
        if not model.head.uses_posterior:
            return {}
        model.head.reset_posterior()
        ridge = model.head.precision.clone()
        seen = 0
        for micro_batch, real in micro_batches:
            batch = collate([s for _, e in micro_batch for s in (e.forward, e.swapped)], self.pad_id)
            batch = batch.to(next(model.parameters()).device)
            before = model.head.precision.clone()
            model.accumulate_posterior(batch.input_ids, batch.attention_mask)
            if not real:
                model.head.precision.copy_(before)
            seen += len(batch.input_ids) if real else 0
        model.head.precision.copy_(ridge + distributed.all_reduce(model.head.precision - ridge))
        return {"posterior/sequences": int(distributed.reduce_sums({"n": seen})["n"])}
