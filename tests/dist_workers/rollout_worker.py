"""Run by tests/test_rollout_distributed.py under `torchrun --nproc-per-node 2` (gloo, CPU).

Each rank shards the same tiny model with FSDP2, generates for its own prompts (a different number
per rank, so the ranks have different numbers of chunks, and rows that finish at different steps),
takes one training step on the sharded model, and writes what it got to <outdir>/rank<N>.json.
"""

from __future__ import annotations

import gc
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from alignkit.models import tiny_model, tiny_tokenizer
from alignkit.rollout import SamplingConfig, TransformersGenerator

TEXTS = [["hello", "a much longer prompt than the others", "x", "what is up?", "0123456789"],
         ["the second rank", "ok"]]
SAMPLING = SamplingConfig(max_new_tokens=12, temperature=1.0, stop=tuple("abcd"))
BATCH_SIZE = 2


def sharded_model():
    """The tiny model (seed 0, as in the test process), each decoder layer and then the root sharded."""
    model = tiny_model(seed=0)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def main(outdir: Path) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    tokenizer, model = tiny_tokenizer(), sharded_model()
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    prompts = [tokenizer.encode(t) for t in TEXTS[rank]]
    seeds = [100 * rank + i for i in range(len(prompts))]
    completions = TransformersGenerator(model, tokenizer, batch_size=BATCH_SIZE).generate(prompts, SAMPLING, seeds)
    generation_forwards = len(forwards)
    ids = torch.tensor([prompts[0]])
    model(input_ids=ids, labels=ids).loss.backward()   # training still works after generating
    result = {"prompts": prompts, "seeds": seeds, "sampling": asdict(SAMPLING), "batch_size": BATCH_SIZE,
              "forwards": generation_forwards,
              "token_ids": [c.token_ids for c in completions], "logprobs": [c.logprobs for c in completions],
              "finish_reasons": [c.finish_reason for c in completions]}
    (outdir / f"rank{rank}.json").write_text(json.dumps(result))
    # FSDP2 keeps gloo work of the backward's reduce-scatter; left for interpreter shutdown, it aborts the
    # process now and then ("terminate called without an active exception")
    del model
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
