"""From a config to a finished run: load data and models, build the objective, train, report.

`train(config)` is the one entry point behind `alignkit sft` and `alignkit preference`.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkit import distributed
from alignkit.algorithms import PREFERENCE_LOSSES, UNPAIRED_LOSSES
from alignkit.config import build, to_dict
from alignkit.data.loaders import load_records
from alignkit.data.tokenize import Encoder, TokenizeConfig
from alignkit.judges.templates import answer_text, pairwise_messages
from alignkit.models.loading import ModelConfig, load_model_and_tokenizer
from alignkit.models.pairwise import PairEncoder
from alignkit.registry import Registry
from alignkit.tasks import TASKS
from alignkit.train.loop import Loop, TrainConfig
from alignkit.train.objectives import OBJECTIVES, ComparisonExample, PairExample, RatedExample
from alignkit.train.offline import OfflineMethod
from alignkit.train.rundir import RunDir

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    train: str | None = None         # file, saved dataset directory or hub id; None: built-in task
    eval: str | None = None          # held-out records; default: `eval_fraction` of `train`
    eval_fraction: float = 0.1       # held out of `train` when no `eval` is given
    split: str = "train"             # the split of a saved dataset or hub dataset
    kind: str | None = None          # "rating" trains kto/bco on thumbs up/down; default from the loss
    columns: dict | None = None      # our field name -> column name in the data
    on_error: str = "raise"          # or "skip": drop bad records, report their count and examples
    max_record_chars: int = 1_000_000  # a record with more characters of text is a bad record (on_error)
    task: str = "cipher"             # built-in task used when `train` is empty
    task_options: dict = field(default_factory=dict)  # e.g. {max_operand: 9}
    task_size: int = 1000            # built-in task: training records
    eval_size: int = 200             # built-in task: held-out records
    flip_rate: float = 0.0           # built-in comparisons: share of labels swapped at random (noise)
    targeted_flip_rate: float = 0.0  # built-in comparisons: share of most confident labels set against gold
    eval_split: str = "eval"         # built-in task split evaluated on: "eval" (in-distribution) or "ood"
    task_corpus: bool = False        # sft on the task's base-model corpus instead of its demonstrations
    seed: int = 0                    # built-in task generation and the held-out draw
    judge_template: str = "pairwise"  # judge-sft: the prompt template judgements are rendered with
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)

    RANGES = {"eval_fraction": (0, 1), "task_size": (1, None), "eval_size": (0, None), "flip_rate": (0, 1),
              "targeted_flip_rate": (0, 1), "max_record_chars": (1, None)}


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    reference: str | None = None     # separate reference model; default: the initial policy
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: dict = field(default_factory=dict)   # {name: ..., options}; default per command
    output_dir: str = "runs"         # where run directories go
    run_name: str | None = None      # default: <command>-<time stamp>


@dataclass
class RunResult:
    run: RunDir
    metrics: dict
    initial_metrics: dict
    model: object
    tokenizer: object
    loop: Loop
    method: OfflineMethod


# ----- data: which record kind each objective reads, and how records become examples -----
OBJECTIVE_DATA = Registry("objective data")


@OBJECTIVE_DATA.register("sft", kind="demonstration")
def _demo_examples(records, encoder: Encoder) -> list:
    return [encoder.encode(r.prompt, r.completion) for r in records]


@OBJECTIVE_DATA.register("paired", kind="comparison")
@OBJECTIVE_DATA.register("reward", kind="comparison", head="reward")
def _pair_examples(records, encoder: Encoder) -> list:
    return [PairExample(encoder.encode(r.prompt, r.chosen), encoder.encode(r.prompt, r.rejected),
                        r.index, r.origin, r.margin) for r in records]


@OBJECTIVE_DATA.register("judge_sft", kind="judgement", objective="sft", options=("judge_template",))
def _judgement_examples(records, encoder: Encoder, judge_template: str = "pairwise") -> list:
    """Think-RM stage 1 (arXiv 2505.16265): the judge prompt for (prompt, a, b) -> reasoning, then verdict."""
    return [encoder.encode(pairwise_messages(judge_template, r.prompt, r.a, r.b), answer_text(r.verdict, r.reasoning))
            for r in records]


@OBJECTIVE_DATA.register("pairwise", kind="comparison", head="pairwise")
def _comparison_examples(records, encoder: Encoder) -> list:
    pairs = PairEncoder(encoder.tokenizer, encoder.cfg)  # prompt and both answers as one sequence, both orders
    examples = [ComparisonExample(pairs.encode(r.prompt, r.chosen, r.rejected), pairs.encode(r.prompt, r.rejected,
                                  r.chosen), 1.0, r.margin, r.index, r.origin) for r in records]
    encoder.truncated += pairs.truncated
    return examples


@OBJECTIVE_DATA.register("unpaired", kind="rating")
def _rated_examples(records, encoder: Encoder) -> list:
    """KTO's mismatched pairs are drawn within each step by the objective (UnpairedObjective), not here."""
    return [RatedExample(encoder.encode(r.prompt, r.completion), r.label, encoder.cfg.max_length) for r in records]


def _task_records(cfg: DataConfig, kind: str) -> tuple[list, list]:
    task = TASKS.get(cfg.task).fn(**cfg.task_options)
    makers = {
        "demonstration": lambda n, seed, split: (task.corpus(n, seed) if cfg.task_corpus
                                                 else task.demonstrations(n, seed, split=split)),
        "comparison": lambda n, seed, split: task.comparisons(
            n, seed, **({"flip_rate": cfg.flip_rate, "targeted_flip_rate": cfg.targeted_flip_rate}
                        if split == "train" else {}), split=split)[0],
        "rating": lambda n, seed, split: task.ratings(n, seed, split=split),
        "judgement": lambda n, seed, split: task.judgements(n, seed, split=split),
    }
    method = {"demonstration": "demonstrations", "comparison": "comparisons", "rating": "ratings",
              "judgement": "judgements"}[kind]
    if not hasattr(task, method):
        raise ValueError(f"task {cfg.task!r} has no {kind} data; tasks: {', '.join(TASKS.names())}")
    make = makers[kind]
    return make(cfg.task_size, cfg.seed, "train"), make(cfg.eval_size, cfg.seed + 10_000, cfg.eval_split)


def load_splits(cfg: DataConfig, kind: str) -> tuple[list, list, list[str]]:
    """Train and eval records of one kind, and the data files used (for the manifest)."""
    if cfg.train is None:
        train, evaluation = _task_records(cfg, kind)
        return train, evaluation, []
    return load_files(cfg, kind)


def load_files(cfg, kind: str) -> tuple[list, list, list[str]]:
    """Records of one kind from `cfg.train` (and `cfg.eval`); the files read. Every trainer holds out the
    same way: without an eval file, a seeded random `eval_fraction` of the training records."""
    limits = {"columns": cfg.columns, "on_error": cfg.on_error, "max_record_chars": cfg.max_record_chars}
    loaded = load_records(cfg.train, kind, split=cfg.split, **limits)
    if loaded.skipped and distributed.is_main():
        log.warning("%s: %s", cfg.train, loaded.summary())
    train, files = loaded.records, [cfg.train]
    if cfg.eval:
        evaluation = load_records(cfg.eval, kind, **limits).records
        files.append(cfg.eval)
    else:
        shuffled = random.Random(cfg.seed).sample(train, len(train))
        n_eval = int(len(train) * cfg.eval_fraction)
        evaluation, train = shuffled[:n_eval], shuffled[n_eval:]
    return train, evaluation, files


FIXED_OBJECTIVES = {"sft": "sft", "reward": "reward", "pairwise-rm": "pairwise", "judge-sft": "judge_sft"}


def objective_name(cfg: RunConfig, command: str) -> str:
    if command in FIXED_OBJECTIVES:
        return FIXED_OBJECTIVES[command]
    loss = cfg.loss.get("name", "dpo")
    if loss in UNPAIRED_LOSSES and (cfg.data.kind == "rating" or loss not in PREFERENCE_LOSSES):
        return "unpaired"
    PREFERENCE_LOSSES.get(loss)  # raises with the list of known losses
    return "paired"


def train(cfg: RunConfig, command: str = "preference", resume: str | Path | None = None,
          model=None, tokenizer=None) -> RunResult:
    """Run one training job end to end and return its run directory and final metrics."""
    if resume and not (Path(resume) / "config.yaml").exists():
        raise FileNotFoundError(f"cannot resume {resume}: no config.yaml there")
    name = objective_name(cfg, command)
    data = OBJECTIVE_DATA.get(name)
    train_records, eval_records, files = load_splits(cfg.data, data.meta["kind"])
    if model is None:
        model, tokenizer = load_model_and_tokenizer(cfg.model, head=data.meta.get("head", "causal_lm"))
    encoder = Encoder(tokenizer, cfg.data.tokenize)
    data_options = {key: getattr(cfg.data, key) for key in data.meta.get("options", ())}
    splits = {split: data.fn(records, encoder, **data_options)
              for split, records in (("train", train_records), ("eval", eval_records))}
    objective_kind = data.meta.get("objective", name)
    options = dict(cfg.loss) if objective_kind != "sft" else {}
    objective = OBJECTIVES.get(objective_kind).fn(splits, tokenizer.pad_token_id, options)
    run = open_run(cfg, command, resume, cfg.train.seed, files)
    if not resume:
        run.log({"step": 0, "event": "data", "train_examples": len(splits["train"]),
                 "eval_examples": len(splits["eval"]), "truncated": encoder.truncated,
                 "appended_without_template": encoder.appended})
    reference = None
    if cfg.reference and objective.uses_reference:
        reference, _ = load_model_and_tokenizer(build(ModelConfig, {"name": cfg.reference}))
    model, reference = (prepare_model(m, cfg.train) if m is not None else None for m in (model, reference))
    method = OfflineMethod(model, tokenizer, objective, cfg.train, run, reference_model=reference)
    loop = Loop(method, cfg.train, run)
    metrics = loop.fit(resume=bool(resume))
    metrics.update(objective.write_reports(run) if distributed.is_main() else {})
    return RunResult(run, metrics, loop.initial_metrics, model, tokenizer, loop, method)


def open_run(cfg, command: str, resume, seed: int, files: list[str]) -> RunDir:
    """The run directory, created by rank 0 (every rank gets its path); config and manifest on a new run."""
    distributed.init(cfg.train.distributed)
    if resume:
        run = RunDir(resume)
    else:
        path = distributed.broadcast_object(
            str(RunDir.create(cfg.output_dir, command, cfg.run_name).path) if distributed.is_main() else None)
        run = RunDir(path)
        run.write_config({"command": command, **to_dict(cfg)})
        run.write_manifest(seed, files)
    if distributed.is_main():
        log.info("run directory: %s", run.path)
    return run


def prepare_model(model, cfg: TrainConfig):
    """On this rank's device, with activation checkpointing if asked, sharded with FSDP2 under torchrun."""
    model.to(distributed.device())
    if cfg.activation_checkpointing and any(p.requires_grad for p in model.parameters()):
        distributed.enable_activation_checkpointing(model)
    precision = "bf16" if cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_available()) \
        else "fp32"
    return distributed.shard(model, cfg.distributed, precision)


def config_from(data: dict) -> RunConfig:
    return build(RunConfig, data)
