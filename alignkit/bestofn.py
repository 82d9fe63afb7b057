"""`alignkit best-of-n`: prompts in, each prompt's best of N sampled completions and its score out.

The sampler of rejection-sampling fine-tuning (RAFT arXiv 2304.06767, ReST arXiv 2308.08998) on its
own: N completions per prompt from the rollout engine (per-prompt seeds, so a prompt's samples do not
depend on the others), scored by any reward source, the best kept. Ties go to the earliest sample; a
prompt whose every score failed is written with `"failed": true`. Under torchrun each rank samples
and scores its contiguous share of the prompts and rank 0 writes the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkit import distributed
from alignkit.config import build, to_dict
from alignkit.data.tokenize import Encoder
from alignkit.models.loading import ModelConfig, load_model_and_tokenizer
from alignkit.rollout import GENERATORS
from alignkit.sources import build_source
from alignkit.train.experience import sampling_seed, score_completions
from alignkit.train.rl import RLDataConfig, RolloutConfig, _default_task, load_prompts


@dataclass
class BestOfNConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    reward: str | dict = "task"     # reward source spec (docs/rewards.md); "task": the built-in task's gold reward
    data: RLDataConfig = field(default_factory=RLDataConfig)   # the prompts (data.train), or a built-in task's
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    n: int = 8                      # samples per prompt
    output: str = "best-of-n.jsonl"  # one JSON line per prompt: prompt, completion, score, scores
    seed: int = 0                   # sampling seeds derive from it and the prompt's position

    RANGES = {"n": (1, None)}


def best_of_n(cfg: BestOfNConfig, model=None, tokenizer=None) -> list[dict]:
    """The rows written to `cfg.output`: each prompt's best completion, its score and all N scores."""
    distributed.init()
    if model is None:
        model, tokenizer = load_model_and_tokenizer(cfg.model)
    records, _ = load_prompts(build(RLDataConfig, {**to_dict(cfg.data), "eval_fraction": 0.0, "eval_size": 0}))
    reward = build_source(_default_task(cfg.reward, cfg))
    encoder = Encoder(tokenizer, cfg.data.tokenize)
    positions = _share(len(records))
    mine = [records[k] for k in positions if k < len(records)]
    generator = GENERATORS.call(cfg.rollout.backend, model.to(distributed.device()), tokenizer, **cfg.rollout.options)
    prompts = [encoder.encode(records[k % len(records)].prompt).prompt for k in positions for _ in range(cfg.n)]
    seeds = [sampling_seed(cfg.seed, 0, 0, k * cfg.n + j) for k in positions for j in range(cfg.n)]
    completions = generator.generate(prompts, cfg.rollout.sampling(), seeds)[:len(mine) * cfg.n]
    expanded = [r for r in mine for _ in range(cfg.n)]
    scores = score_completions(reward, expanded, completions) if mine else None
    rows = [_row(record, completions[k * cfg.n:(k + 1) * cfg.n], scores, k, cfg.n) for k, record in enumerate(mine)]
    rows = [row for part in distributed.gather_objects(rows) for row in part]
    if distributed.is_main():
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        with open(cfg.output, "w") as out:
            out.writelines(json.dumps(row) + "\n" for row in rows)
    return rows


def _row(record, completions, scores, k: int, n: int) -> dict:
    values = scores.values.float()[k * n:(k + 1) * n]
    failed = scores.failure_mask()[k * n:(k + 1) * n]
    usable = torch.where(failed, torch.full_like(values, -torch.inf), values)
    best = int(usable.argmax())
    return {"prompt": record.prompt, "completion": completions[best].text, "score": float(values[best]),
            "scores": values.tolist(), "failed": bool(failed.all())}


def _share(n: int) -> list[int]:
    """This rank's positions of n prompts padded to a multiple of the world size (positions >= n: padding,
    sampled so every rank makes as many forward calls, then dropped)."""
    world = distributed.world_size()
    return distributed.shard_of(list(range(-(-n // world) * world)))
