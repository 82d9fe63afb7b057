"""Checkpoints across world sizes, run by tests/test_checkpoint.py under `torchrun --nproc-per-node 2`.

    python -m torch.distributed.run --nproc-per-node 2 checkpoint_worker.py WORKDIR

WORKDIR holds a checkpoint saved by one process (`one/`) and the full tensors it holds
(`one.safetensors`). Here the tiny model is sharded with FSDP2 and that checkpoint is loaded
(resharded) and checked; then one more step is trained and saved (`two/`), the full tensors are
written to `two.safetensors` and the model is exported (`export/`), as is a sharded LoRA model
(`lora/`, merged too) and a model with tied embeddings (`tied/`), for the test to check in one
process.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from alignkit.models.tiny import tiny_model_and_tokenizer


def build():
    """(container, policy, tokenizer): the tiny model in a container, as the training loop holds it."""
    policy, tokenizer = tiny_model_and_tokenizer(seed=0)
    return nn.ModuleDict({"policy": policy}), policy, tokenizer


def adamw(container) -> torch.optim.Optimizer:
    return torch.optim.AdamW(container.parameters(), lr=1e-2)


def lora_policy():
    """(peft model, tokenizer): the tiny model with LoRA adapters, made non-zero so that merging them matters."""
    from alignkit.models.loading import with_lora

    policy, tokenizer = tiny_model_and_tokenizer(seed=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        lora = with_lora(policy, {"r": 4, "lora_alpha": 8})
        with torch.no_grad():
            for name, param in lora.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.1)
    return lora, tokenizer


def shard(model, layers) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in layers:
        fully_shard(layer)
    fully_shard(model)


def train_step(policy, optimizer) -> None:
    ids = torch.arange(32).reshape(2, 16) % 100 + 4
    policy(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def full_tensors(container, optimizer) -> dict[str, torch.Tensor]:
    """Every weight and optimizer tensor, unsharded, by name (collective; empty on ranks other than 0)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optimizer_state = get_state_dict(container, optimizer, options=options)
    tensors = {f"model/{name}": t for name, t in model_state.items()}
    for param, values in optimizer_state.get("state", {}).items():
        tensors.update({f"optim/{param}/{name}": t for name, t in values.items()})
    return tensors


def main(workdir: Path) -> None:
    import torch.distributed as dist

    from alignkit.train.checkpoint import export_model, load_checkpoint, save_checkpoint

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    container, policy, tokenizer = build()
    shard(policy, policy.model.layers)
    optimizer = adamw(container)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = load_checkpoint(workdir / "one" / "step-0000001", container, optimizer)
    assert state == {"note": "one", "step": 1}, state
    rng_warnings = [w for w in caught if "random streams" in str(w.message)]
    assert len(rng_warnings) == rank, f"rank {rank}: {[str(w.message) for w in caught]}"
    loaded = full_tensors(container, optimizer)
    if rank == 0:
        expected = load_file(workdir / "one.safetensors")
        assert loaded.keys() == expected.keys(), sorted(loaded.keys() ^ expected.keys())
        for name, value in expected.items():
            assert torch.equal(loaded[name], value), name

    train_step(policy, optimizer)
    save_checkpoint(workdir / "two", 2, container, optimizer, {"note": "two"})
    trained = full_tensors(container, optimizer)
    if rank == 0:
        save_file(trained, workdir / "two.safetensors")
    export_model(policy, tokenizer, workdir / "export")

    lora, tokenizer = lora_policy()
    shard(lora, lora.get_base_model().model.layers)
    export_model(lora, tokenizer, workdir / "lora", merge_lora=True)

    tied = tied_model()
    shard(tied, tied.model.layers)
    export_model(tied, tokenizer, workdir / "tied")
    dist.destroy_process_group()


def tied_model():
    """A tiny model whose LM head is its embedding matrix (as SmolLM2's is)."""
    from alignkit.models.tiny import TinyConfig, tiny_model

    model = tiny_model(TinyConfig(seed=3))
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    return model


if __name__ == "__main__":
    main(Path(sys.argv[1]))
