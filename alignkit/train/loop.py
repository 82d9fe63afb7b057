"""The one training loop under every trainer, offline and online, in one process or under torchrun.

The loop owns the optimizer and its schedule, precision, the non-finite policy, checkpoints,
eval/save cadence, metrics and progress. What a step computes is the `Method`'s: an offline
objective over batches of a dataset (`train/offline.py`) or an online step that generates, scores,
estimates advantages and updates (`train/online.py`). A method calls back into the loop for the
parts every method shares: `autocast()`, `backward(loss)` and `apply_gradients()`.

Distributed: each rank runs the same loop on its share of every step. A method divides its loss by
the step's global normaliser (all ranks' examples or tokens), and `backward` multiplies by the world
size because FSDP2 averages gradients over ranks; the update is then the same at any world size.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from alignkit import distributed, tracking
from alignkit.distributed import DistributedConfig
from alignkit.train.checkpoint import CorruptCheckpointError, complete_checkpoints, load_checkpoint, save_checkpoint
from alignkit.train.progress import ProgressReporter
from alignkit.train.rundir import RunDir

log = logging.getLogger(__name__)
SCHEDULES = {
    "constant": lambda progress: 1.0,
    "linear": lambda progress: 1.0 - progress,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
}
NONFINITE_POLICIES = ("stop", "skip")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    """What every trainer shares (`train.*`); RL-only options live in `rl.*`."""

    steps: int | None = None          # optimizer steps (RL steps online); offline default: `epochs` over the data
    epochs: float = 1.0               # offline only
    batch_size: int = 8               # offline: examples per optimizer step, over all ranks
    micro_batch_size: int | None = None  # examples (completions online) per forward/backward on one rank
    lr: float = 1e-4                  # AdamW learning rate (policy; the critic's is rl.critic_lr)
    weight_decay: float = 0.0         # AdamW weight decay
    warmup_steps: int = 0             # linear warmup, then the schedule
    schedule: str = "cosine"          # cosine, linear or constant decay after warmup
    max_grad_norm: float = 1.0        # 0 disables clipping (the norm is still checked and logged)
    precision: str = "auto"           # auto: bf16 on CUDA, fp32 on CPU; or fp32 / bf16
    activation_checkpointing: bool = False  # recompute each decoder layer's activations in the backward
    eval_every: int = 0               # steps; 0: only before and after training
    save_every: int = 0               # steps; 0: only at the end
    keep_checkpoints: int = 2         # newest checkpoints kept on disk
    save_final_optimizer: bool = True  # false: the last checkpoint holds no optimizer state (not resumable)
    merge_lora: bool = False          # LoRA runs: RUN_DIR/model/merged, the adapter merged in, beside the adapter
    on_nonfinite: str = "stop"        # stop: save, then raise; skip: drop the step and go on
    max_nonfinite_skips: int = 10
    seed: int = 0                     # data order and sampling seeds, written to the manifest
    progress: bool = True             # a live bar on a terminal, a line every 10 s otherwise (rank 0)
    report_to: str = "none"           # trackers, comma-separated: tensorboard, wandb, mlflow, trackio (or none)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    RANGES = {"steps": (1, None), "epochs": (0, None), "batch_size": (1, None), "micro_batch_size": (1, None),
              "lr": (0, None), "weight_decay": (0, None), "warmup_steps": (0, None), "max_grad_norm": (0, None),
              "eval_every": (0, None), "save_every": (0, None), "keep_checkpoints": (0, None),
              "max_nonfinite_skips": (0, None)}
    CHOICES = {"schedule": tuple(SCHEDULES), "on_nonfinite": NONFINITE_POLICIES, "precision": PRECISIONS}

    def __post_init__(self) -> None:
        tracking.names(self.report_to)  # an unknown tracker fails here, before any run directory

    def check(self) -> None:
        """The choices again, for a config built in Python rather than read (`build` checks those)."""
        for name, allowed in self.CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"train.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")


class NonFiniteError(RuntimeError):
    pass


def resolved_precision(precision: str, device: torch.device) -> str:
    return ("bf16" if device.type == "cuda" else "fp32") if precision == "auto" else precision


def autocast(precision: str, device: torch.device):
    """bf16 autocast for precision bf16 (or auto on CUDA); otherwise plain fp32."""
    if resolved_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Method(Protocol):
    """What plugs into the loop: one step of an offline objective or of online RL."""

    total_steps: int

    def modules(self) -> dict[str, nn.Module]: ...          # trained modules, checkpointed by name
    def param_groups(self) -> list[dict]: ...               # optimizer groups (lr per group)
    def prepare(self, loop: Loop, resuming: bool) -> None: ...
    def train_step(self, loop: Loop) -> dict: ...           # raises FloatingPointError on a non-finite value
    def evaluate(self, loop: Loop) -> dict: ...
    def after_training(self, loop: Loop) -> dict: ...
    def state_dict(self) -> dict: ...                       # JSON values and tensors, the same on every rank
    def load_state_dict(self, state: dict) -> None: ...
    def export(self, path: Path, loop: Loop) -> None: ...   # the final model as a plain Hugging Face directory


class Loop:
    """Optimizer, schedule, precision, non-finite policy, checkpoints, cadence, metrics, progress."""

    def __init__(self, method: Method, cfg: TrainConfig, run: RunDir):
        cfg.check()
        self.method, self.cfg, self.run = method, cfg, run
        self.device = distributed.device()
        self.total_steps = method.total_steps
        self.optimizer = torch.optim.AdamW(method.param_groups(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.container = nn.ModuleDict(method.modules())
        self.step, self.nonfinite_skips = 0, 0
        self.initial_metrics: dict = {}

    # ----- what methods call -----
    def _lr_factor(self, step: int) -> float:
        if step < self.cfg.warmup_steps:
            return (step + 1) / self.cfg.warmup_steps
        span = max(1, self.total_steps - self.cfg.warmup_steps)
        return SCHEDULES[self.cfg.schedule](min(1.0, (step - self.cfg.warmup_steps) / span))

    def autocast(self):
        return autocast(self.cfg.precision, self.device)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a loss already divided by the step's global normaliser (FSDP2 averages over ranks)."""
        if not torch.isfinite(loss):
            raise FloatingPointError("loss")
        (loss * distributed.world_size()).backward()

    def apply_gradients(self) -> float:
        """Clip each parameter group on its own, step, clear; returns the first group's gradient norm."""
        clip = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else math.inf
        norms = []
        for group in self.optimizer.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, clip) if params else torch.zeros(())
            norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
        if not all(math.isfinite(n) for n in norms):
            raise FloatingPointError("gradient norm")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norms[0]

    def log(self, record: dict) -> None:
        self.run.log(record)

    # ----- non-finite values -----
    def _nonfinite(self, what: str) -> dict:
        self.optimizer.zero_grad(set_to_none=True)
        where = f"non-finite {what} at step {self.step + 1}"
        if self.cfg.on_nonfinite == "skip" and self.nonfinite_skips < self.cfg.max_nonfinite_skips:
            self.nonfinite_skips += 1
            self.log({"step": self.step + 1, "event": "skipped_nonfinite", "detail": where})
            return {"skipped_nonfinite": 1.0}
        saved = self.save()
        raise NonFiniteError(f"{where}; the last good weights are saved in {saved}. Lower train.lr, check the "
                             "data or the reward, or set train.on_nonfinite=skip.")

    # ----- checkpoints -----
    def _state(self) -> dict:
        return {"loop": {"nonfinite_skips": self.nonfinite_skips, "scheduler": self.scheduler.state_dict()},
                "method": self.method.state_dict()}

    def save(self, optimizer: bool = True) -> Path:
        return save_checkpoint(self.run.checkpoints, self.step, self.container, self.optimizer, self._state(),
                               keep=self.cfg.keep_checkpoints, save_optimizer=optimizer)

    def _resume(self) -> Path | None:
        """Restore the newest readable checkpoint. A damaged one is named and skipped for the one before;
        with none at all (killed before the first save) the run starts again from step 0 in place."""
        candidates = complete_checkpoints(self.run.checkpoints)
        if not candidates:
            log.warning("%s: no checkpoint was saved before the run stopped; starting again from step 0",
                        self.run.path)
            self.run.truncate_metrics(0, keep_events_only=True)
            return None
        for checkpoint in candidates:
            try:
                self._restore(checkpoint)
                return checkpoint
            except CorruptCheckpointError as err:
                log.warning("skipping damaged checkpoint %s: %s", checkpoint, err)
        raise CorruptCheckpointError(f"no readable checkpoint in {self.run.checkpoints} (tried "
                                     f"{', '.join(p.name for p in candidates)})")

    def _restore(self, checkpoint: Path) -> None:
        state = load_checkpoint(checkpoint, self.container, self.optimizer)
        self.scheduler.load_state_dict(state["loop"]["scheduler"])
        self.nonfinite_skips = state["loop"]["nonfinite_skips"]
        self.method.load_state_dict(state["method"])
        self.step = state["step"]
        self.run.truncate_metrics(self.step)

    # ----- the loop -----
    def fit(self, resume: bool = False) -> dict:
        checkpoint = self._resume() if resume else None
        self._start_trackers(replay=checkpoint is None)
        try:
            return self._fit(checkpoint)
        finally:
            trackers, self.run.trackers = self.run.trackers, []
            tracking.finish(trackers)

    def _start_trackers(self, replay: bool) -> None:
        """train.report_to's trackers on rank 0, given what the run logged before the loop (its data line)."""
        if not distributed.is_main() or not tracking.names(self.cfg.report_to):
            return
        config = self.run.read_config() if (self.run.path / "config.yaml").exists() else {}
        trackers = tracking.start(self.cfg.report_to, self.run.path, config, self.run.path.name,
                                  first_step=0 if replay else self.step + 1)
        for record in self.run.metrics() if replay else ():
            tracking.log(trackers, record)
        self.run.trackers = trackers

    def _fit(self, checkpoint: Path | None) -> dict:
        self.method.prepare(self, resuming=checkpoint is not None)
        if checkpoint is None:
            self.initial_metrics = self.method.evaluate(self)
            self.log({"step": 0, **self.initial_metrics})
        progress = ProgressReporter(self.total_steps, self.run.path.name, start=self.step,
                                    enabled=self.cfg.progress and distributed.is_main())
        try:
            while self.step < self.total_steps:
                self._one_step(progress)
        finally:
            progress.close()
        metrics = self.method.after_training(self)
        if metrics:
            self.log({"step": self.step, "event": "after_training", **metrics})
        final = self.method.evaluate(self)
        self.log({"step": self.step, **final})
        self.save(optimizer=self.cfg.save_final_optimizer)
        self.method.export(self.run.path / "model", self)
        return final

    def _one_step(self, progress: ProgressReporter) -> None:
        try:
            metrics = self.method.train_step(self)
        except FloatingPointError as err:
            metrics = self._nonfinite(str(err))
        self.scheduler.step()
        self.step += 1
        metrics.setdefault("lr", self.scheduler.get_last_lr()[0])
        self.log({"step": self.step, **{f"train/{k}": v for k, v in metrics.items()}})
        within = self.step < self.total_steps
        if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and within:
            self.log({"step": self.step, **self.method.evaluate(self)})
        if self.cfg.save_every and self.step % self.cfg.save_every == 0 and within:
            self.save()
        progress.update(self.step, metrics)

