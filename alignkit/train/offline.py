"""An offline objective in the loop: SFT, preference losses, reward and preference models.

A step's examples are a pure function of (seed, step), so resume is exact. Under torchrun each rank
takes a contiguous share of the step's examples; the loss is divided by the normaliser of the whole
step over all ranks (`objective.count`), so the gradient does not depend on the world size or the
micro-batch size. Every rank makes the same number of forward calls (FSDP2 needs it): passes over a
whole split (reference log-probs, evaluation) pad a rank's share with chunks whose results are dropped.
"""

from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from alignkit import distributed
from alignkit.train.checkpoint import export_model
from alignkit.train.loop import Loop, TrainConfig
from alignkit.train.objectives import Objective


def rank_chunks(ids: list[int], size: int) -> list[tuple[list[int], bool]]:
    """This rank's strided share of `ids` in chunks of `size`, as (chunk, real); every rank gets as many
    chunks, the missing ones filled with a repeat of `ids[:1]` marked not real."""
    world = distributed.world_size()
    mine = ids[distributed.rank()::world]
    count = math.ceil(math.ceil(len(ids) / world) / size)
    chunks = [(mine[i:i + size], True) for i in range(0, len(mine), size)]
    return chunks + [(ids[:1], False)] * (count - len(chunks))


class OfflineMethod:
    """Micro-batches, accumulation and the reference log-prob cache for one `Objective`."""

    def __init__(self, model, tokenizer, objective: Objective, cfg: TrainConfig, run, reference_model=None):
        self.model, self.tokenizer, self.objective, self.cfg, self.run = model, tokenizer, objective, cfg, run
        self.reference_model = reference_model
        world = distributed.world_size()
        if cfg.batch_size % world:
            raise ValueError(f"train.batch_size ({cfg.batch_size}) must be a multiple of the world size ({world})")
        self.micro = cfg.micro_batch_size or cfg.batch_size // world
        self.n_train = len(objective.splits["train"])
        per_epoch = math.ceil(self.n_train / cfg.batch_size)
        self.total_steps = cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * per_epoch))
        self._order_cache: tuple[int, list[int]] = (-1, [])

    def modules(self) -> dict:
        return {"model": self.model}

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    # ----- data order -----
    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order_cache[0] != epoch:
            order = list(range(self.n_train))
            random.Random(self.cfg.seed * 1_000_003 + epoch).shuffle(order)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def batch_indices(self, step: int) -> list[int]:
        """Examples of optimizer step `step` over all ranks: a pure function of (seed, step)."""
        start = step * self.cfg.batch_size
        out = []
        while len(out) < self.cfg.batch_size:
            epoch, offset = divmod(start + len(out), self.n_train)
            order = self._epoch_order(epoch)
            out.extend(order[offset:offset + self.cfg.batch_size - len(out)])
        return out

    def _micro_batches(self, ids: list[int], split: str = "train"):
        examples = self.objective.splits[split]
        by_length = sorted(ids, key=lambda i: len(examples[i]))
        for start in range(0, len(by_length), self.micro):
            yield [(i, examples[i]) for i in by_length[start:start + self.micro]]

    # ----- reference log-probs, computed once over all ranks and cached in the run directory -----
    def prepare(self, loop: Loop, resuming: bool) -> None:
        if not self.objective.uses_reference:
            return
        self.objective.plan_steps(self.batch_indices, self.total_steps)
        cache = self.run.path / "reference_logps.safetensors"
        if cache.exists():
            self.objective.reference = load_file(cache)
            return
        if resuming:
            raise RuntimeError(f"cannot resume: the reference cache {cache} is missing")
        ref = (self.reference_model or self.model).eval()
        with loop.autocast():
            self.objective.reference = {split: self._reference(ref, split)
                                        for split in self.objective.splits if self.objective.splits[split]}
        if distributed.is_main():
            save_file({k: v.contiguous() for k, v in self.objective.reference.items()}, cache)
        distributed.barrier()
        self.reference_model = None  # the reference leaves memory once its log-probs are cached

    def _reference(self, model, split: str) -> torch.Tensor:
        n = len(self.objective.splits[split])
        order = sorted(range(n), key=lambda i: len(self.objective.splits[split][i]))
        out = None
        for ids, real in rank_chunks(order, self.micro):
            values = self.objective.compute_reference(model, split, ids)
            out = torch.zeros(n, values.shape[1]) if out is None else out
            if real:
                out[ids] = values
        return distributed.all_reduce(out)

    # ----- one optimizer step -----
    def train_step(self, loop: Loop, ids: list[int] | None = None) -> dict:
        started = time.perf_counter()
        ids = self.batch_indices(loop.step) if ids is None else ids
        self.model.train()
        everything = [(i, self.objective.splits["train"][i]) for i in ids]
        mine = distributed.shard_of(ids)
        norm = self.objective.count(everything)
        with loop.autocast():
            stats = self.objective.step_stats(self.model, everything)
        sums = defaultdict(float)
        for micro_batch in self._micro_batches(mine):
            with loop.autocast():
                loss_sum, metrics = self.objective.loss_sum(self.model, micro_batch, "train", stats, True)
            loop.backward(loss_sum / norm)
            for key, value in metrics.items():
                sums[key] += float(value)
        grad_norm = loop.apply_gradients()
        self.objective.end_step()
        out = {k: v / norm for k, v in distributed.reduce_sums(sums).items()}
        out["grad_norm"] = grad_norm
        out["tokens_per_s"] = sum(len(example) for _, example in everything) / (time.perf_counter() - started)
        return out

    # ----- evaluation -----
    @torch.no_grad()
    def evaluate(self, loop: Loop, split: str = "eval") -> dict:
        examples = self.objective.splits.get(split) or []
        if not examples:
            return {}
        self.model.eval()
        sums, total = defaultdict(float), 0
        order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
        for ids, real in rank_chunks(order, self.micro):
            micro_batch = [(i, examples[i]) for i in ids]
            with loop.autocast():
                _, metrics = self.objective.loss_sum(self.model, micro_batch, split, {}, False)
            if real:
                for key, value in metrics.items():
                    sums[key] += float(value)
                total += self.objective.count(micro_batch)
        sums = distributed.reduce_sums({**sums, "_count": total})
        total = sums.pop("_count")
        return {f"{split}/{k}": v / total for k, v in sums.items()}

    @torch.no_grad()
    def after_training(self, loop: Loop) -> dict:
        """The objective's closing pass over the training split (SNGP's posterior)."""
        self.model.eval()
        order = list(range(self.n_train))
        batches = (([(i, self.objective.splits["train"][i]) for i in ids], real)
                   for ids, real in rank_chunks(order, self.micro))
        with loop.autocast():
            return self.objective.after_training(self.model, batches)

    # ----- state -----
    def state_dict(self) -> dict:
        return self.objective.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.objective.load_state_dict(state)

    def export(self, path: Path, loop: Loop) -> None:
        export_model(self.model, self.tokenizer, path, merge_lora=loop.cfg.merge_lora)
