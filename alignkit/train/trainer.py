"""The one supervised loop: SFT, reward-free offline preference training, paired or unpaired."""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from alignkit.train.checkpoint import (
        load_state,
    restore_weights,
    resume_point,
    save_checkpoint,
    set_rng_state,
)
from alignkit.train.objectives import Objective
from alignkit.train.progress import ProgressReporter
from alignkit.train.rundir import RunDir

SCHEDULES = {
    "constant": lambda progress: 1.0,
    "linear": lambda progress: 1.0 - progress,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
}
NONFINITE_POLICIES = ("stop", "skip")


@dataclass
class TrainConfig:
    steps: int | None = None          # optimizer steps; default: `epochs` over the training set
    epochs: float = 1.0
    batch_size: int = 8               # examples per optimizer step
    micro_batch_size: int | None = None  # examples per forward/backward; default: batch_size
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    max_grad_norm: float = 1.0        # 0 disables clipping (the norm is still checked and logged)
    precision: str = "auto"           # auto: bf16 autocast on CUDA, fp32 on CPU; or fp32 / bf16
    eval_every: int = 0               # steps; 0: only before and after training
    save_every: int = 0               # steps; 0: only at the end
    keep_checkpoints: int = 2
    on_nonfinite: str = "stop"        # stop: save, then raise; skip: drop the step and go on
    max_nonfinite_skips: int = 10
    seed: int = 0
    progress: bool = True


class NonFiniteError(RuntimeError):
    pass


def autocast(precision: str, device: torch.device):
    """bf16 autocast for precision bf16, or auto on CUDA; otherwise plain fp32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Trainer:
    """Micro-batches, accumulation, AdamW with warmup and decay, checkpoints and metrics."""

    def __init__(self, model, tokenizer, objective: Objective, cfg: TrainConfig, run: RunDir,
                 reference_model=None):
        if cfg.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule must be one of {sorted(SCHEDULES)}, got {cfg.schedule!r}")
        if cfg.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"train.on_nonfinite must be one of {NONFINITE_POLICIES}")
        self.model, self.tokenizer, self.objective, self.cfg, self.run = model, tokenizer, objective, cfg, run
        self.reference_model = reference_model
        self.micro = cfg.micro_batch_size or cfg.batch_size
        self.n_train = len(objective.splits["train"])
        per_epoch = math.ceil(self.n_train / cfg.batch_size)
        self.total_steps = cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * per_epoch))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step, self.nonfinite_skips = 0, 0
        self._order_cache: tuple[int, list[int]] = (-1, [])
        self.initial_metrics: dict = {}

    # ----- schedule and data order -----
    def _lr_factor(self, step: int) -> float:
        if step < self.cfg.warmup_steps:
            return (step + 1) / self.cfg.warmup_steps
        span = max(1, self.total_steps - self.cfg.warmup_steps)
        return SCHEDULES[self.cfg.schedule](min(1.0, (step - self.cfg.warmup_steps) / span))

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order_cache[0] != epoch:
            order = list(range(self.n_train))
            random.Random(self.cfg.seed * 1_000_003 + epoch).shuffle(order)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def batch_indices(self, step: int) -> list[int]:
        """Examples of optimizer step `step`: a pure function of (seed, step), so resume is exact."""
        start = step * self.cfg.batch_size
        out = []
        while len(out) < self.cfg.batch_size:
            epoch, offset = divmod(start + len(out), self.n_train)
            order = self._epoch_order(epoch)
            out.extend(order[offset:offset + self.cfg.batch_size - len(out)])
        return out

    def _autocast(self):
        return autocast(self.cfg.precision, self.device)

    # ----- reference log-probs, computed once and cached in the run directory -----
    def _prepare_reference(self, resuming: bool) -> None:
        if not self.objective.uses_reference:
            return
        cache = self.run.path / "reference_logps.safetensors"
        if cache.exists():
            self.objective.reference = load_file(cache)
            return
        if resuming:
            raise RuntimeError(f"cannot resume: the reference cache {cache} is missing")
        ref = self.reference_model or self.model
        ref.to(self.device).eval()
        with self._autocast():
            self.objective.reference = {
                split: self.objective.compute_reference(ref, split, self.micro)
                for split in self.objective.splits if self.objective.splits[split]}
        save_file({k: v.contiguous() for k, v in self.objective.reference.items()}, cache)
        self.reference_model = None  # the reference leaves memory once its log-probs are cached

    # ----- one optimizer step -----
    def _micro_batches(self, ids: list[int], split: str = "train"):
        examples = self.objective.splits[split]
        by_length = sorted(ids, key=lambda i: len(examples[i]))
        for start in range(0, len(by_length), self.micro):
            yield [(i, examples[i]) for i in by_length[start:start + self.micro]]

    def train_step(self, ids: list[int]) -> dict:
        self.model.train()
        examples = [(i, self.objective.splits["train"][i]) for i in ids]
        with self._autocast():
            stats = self.objective.step_stats(self.model, examples)
        norm = self.objective.count(examples)
        sums = defaultdict(float)
        for micro_batch in self._micro_batches(ids):
            with self._autocast():
                loss_sum, metrics = self.objective.loss_sum(self.model, micro_batch, "train", stats, True)
            loss = loss_sum / norm
            if not torch.isfinite(loss):
                return self._nonfinite("loss", [i for i, _ in micro_batch])
            loss.backward()
            for key, value in metrics.items():
                sums[key] += float(value)
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        if not torch.isfinite(grad_norm):
            return self._nonfinite("gradient norm", ids)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.objective.end_step()
        out = {k: v / norm for k, v in sums.items()}
        out.update(grad_norm=float(grad_norm), lr=self.scheduler.get_last_lr()[0])
        return out

    def _nonfinite(self, what: str, ids: list[int]) -> dict:
        self.optimizer.zero_grad(set_to_none=True)
        where = f"non-finite {what} at step {self.step + 1} (training examples {sorted(ids)[:8]})"
        if self.cfg.on_nonfinite == "skip" and self.nonfinite_skips < self.cfg.max_nonfinite_skips:
            self.nonfinite_skips += 1
            self.run.log({"step": self.step + 1, "event": "skipped_nonfinite", "detail": where})
            return {"skipped_nonfinite": 1.0}
        saved = self.save()  # the weights were not touched by the bad step: keep them
        raise NonFiniteError(f"{where}; weights left unchanged and saved in {saved}. "
                             "Lower the learning rate, check the data, or set train.on_nonfinite=skip.")

    # ----- evaluation -----
    @torch.no_grad()
    def evaluate(self, split: str = "eval") -> dict:
        examples = self.objective.splits.get(split) or []
        if not examples:
            return {}
        self.model.eval()
        sums, total = defaultdict(float), 0
        for micro_batch in self._micro_batches(list(range(len(examples))), split):
            with self._autocast():
                _, metrics = self.objective.loss_sum(self.model, micro_batch, split, {}, False)
            for key, value in metrics.items():
                sums[key] += float(value)
            total += self.objective.count(micro_batch)
        return {f"{split}/{k}": v / total for k, v in sums.items()}

    # ----- checkpoints -----
    def _state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "objective": self.objective.state_dict(), "nonfinite_skips": self.nonfinite_skips}

    def save(self) -> Path:
        return save_checkpoint(self.run.checkpoints, self.step, self.model, self.tokenizer,
                               self._state(), keep=self.cfg.keep_checkpoints)

    def _restore(self, checkpoint: Path) -> None:
        restore_weights(self.model, checkpoint)
        state = load_state(checkpoint)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.objective.load_state_dict(state["objective"])
        self.nonfinite_skips = state["nonfinite_skips"]
        self.step = state["step"]
        set_rng_state(state["rng"])
        self.run.truncate_metrics(self.step)

    @torch.no_grad()
    def _after_training(self) -> None:
        """The objective's closing pass over the training split (SNGP's posterior), before the final save."""
        self.model.eval()
        with self._autocast():
            metrics = self.objective.after_training(self.model, self._micro_batches(list(range(self.n_train))))
        if metrics:
            self.run.log({"step": self.step, "event": "after_training", **metrics})

    # ----- the loop -----
    def fit(self, resume: bool = False) -> dict:
        checkpoint = resume_point(self.run.checkpoints, resume)
        if checkpoint is not None:
            self._restore(checkpoint)
        self._prepare_reference(resuming=checkpoint is not None)
        if checkpoint is None:
            self.initial_metrics = self.evaluate()
            self.run.log({"step": 0, **self.initial_metrics})
        progress = ProgressReporter(self.total_steps, self.run.path.name, start=self.step,
                                    enabled=self.cfg.progress)
        try:
            while self.step < self.total_steps:
                started = time.perf_counter()
                ids = self.batch_indices(self.step)
                metrics = self.train_step(ids)
                self.step += 1
                tokens = sum(len(self.objective.splits["train"][i]) for i in ids)
                metrics["tokens_per_s"] = tokens / (time.perf_counter() - started)
                self.run.log({"step": self.step, **{f"train/{k}": v for k, v in metrics.items()}})
                if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and self.step < self.total_steps:
                    self.run.log({"step": self.step, **self.evaluate()})
                if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < self.total_steps:
                    self.save()
                progress.update(self.step, metrics)
        finally:
            progress.close()
        self._after_training()
        final = self.evaluate()
        self.run.log({"step": self.step, **final})
        self.save()
        return final
