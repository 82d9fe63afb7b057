"""Checkpoints: exact round trips, resharding between 1 and 2 ranks, no pickle from disk, model export."""

import copy
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from dist_workers.checkpoint_worker import adamw, build, full_tensors, lora_policy, tied_model, train_step
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.metadata import BytesStorageMetadata
from torchrun import torchrun
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignkit.models.loading import with_lora
from alignkit.models.tiny import tiny_model_and_tokenizer, tiny_reward_model
from alignkit.train.checkpoint import (
    UnsafeCheckpointError,
    export_model,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

WORKER = Path(__file__).parent / "dist_workers" / "checkpoint_worker.py"


def assert_same(actual, expected, where="value"):
    """Equal, with the same types all the way down (int stays int, tuple stays tuple), tensors bit for bit;
    any dict (OrderedDict too) matches any dict."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: {type(actual).__name__} is not a dict"
        assert actual.keys() == expected.keys(), f"{where}: keys differ by {sorted(actual.keys() ^ expected.keys())}"
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}[{key!r}]")
        return
    assert type(actual) is type(expected), f"{where}: {type(actual).__name__} != {type(expected).__name__}"
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected), where
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def trained(lora: bool):
    container, policy, _ = build()
    if lora:
        container["policy"] = policy = with_lora(policy, {"r": 4, "lora_alpha": 8})
    optimizer = torch.optim.AdamW([p for p in container.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.5, total_iters=10)
    for _ in range(2):
        train_step(policy, optimizer)
        scheduler.step()
    return container, policy, optimizer, scheduler


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_checkpoint_restores_everything_bit_for_bit(tmp_path, lora):
    container, policy, optimizer, scheduler = trained(lora)
    state = {"scheduler": scheduler.state_dict(), "counts": {"samples": 32, "mean": 0.1, "whole": 2.0},
             "history": [1, 2.5, None, "text", [True]], "ema": torch.randn(3, dtype=torch.float64)}
    weights = {k: v.clone() for k, v in container.state_dict().items()}
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    checkpoint = save_checkpoint(tmp_path, 2, container, optimizer, state)
    expected_draws = draws()

    train_step(policy, optimizer)   # move everything on: weights, optimizer, schedule, random streams
    scheduler.step()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    restored = load_checkpoint(checkpoint, container, optimizer)

    assert draws() == expected_draws
    assert_same(container.state_dict(), weights, "weights")
    assert_same(optimizer.state_dict(), optimizer_state, "optimizer")
    assert_same(restored, {**state, "step": 2}, "state")
    scheduler.load_state_dict(restored["scheduler"])
    assert_same(scheduler.state_dict(), state["scheduler"], "scheduler")


def test_old_checkpoints_are_pruned_and_the_optimizer_can_be_left_out(tmp_path):
    container, _, _ = build()
    optimizer = adamw(container)
    (tmp_path / ".step-0000009.tmp").mkdir()   # a save killed midway
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, container, optimizer, {}, keep=2, save_optimizer=step < 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-0000002", "step-0000003"]
    (tmp_path / "latest").unlink()
    (tmp_path / "step-0000004").mkdir()   # no marker: incomplete
    assert latest_checkpoint(tmp_path) == tmp_path / "step-0000003"
    with pytest.raises(RuntimeError, match="no optimizer state"):
        load_checkpoint(tmp_path / "step-0000003", container, optimizer)
    assert load_checkpoint(tmp_path / "step-0000003", container, None) == {"step": 3}
    assert load_checkpoint(tmp_path / "step-0000002", container, optimizer) == {"step": 2}


# ----- nothing is unpickled from disk -----

class Payload:
    """Unpickling this runs a shell command that creates `marker`: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    container, _, _ = build()
    root = tmp_path_factory.mktemp("saved")
    return save_checkpoint(root, 1, container, adamw(container), {"note": "x", "ones": torch.ones(2)})


def _rewrite_metadata(checkpoint: Path, change) -> Path:
    path = checkpoint / "dcp" / ".metadata"
    metadata = pickle.loads(path.read_bytes())   # our own file, just written
    change(metadata)
    path.write_bytes(pickle.dumps(metadata))
    return path


@pytest.mark.parametrize("name", ["dcp/.metadata", "state.json", "state.safetensors", "optimizer.json",
                                  "rng/rank-00000.safetensors"])
def test_a_pickle_payload_anywhere_is_refused_without_running(saved, tmp_path, name):
    checkpoint = shutil.copytree(saved, tmp_path / "checkpoint")
    marker = tmp_path / "payload-ran"
    if name == "dcp/.metadata":   # hidden among the genuine metadata objects
        path = _rewrite_metadata(checkpoint, lambda m: setattr(m.storage_meta, "modules", [Payload(marker)]))
    else:
        path = checkpoint / name
        path.write_bytes(pickle.dumps(Payload(marker)))
    container, _, _ = build()
    with pytest.raises(UnsafeCheckpointError, match=re.escape(str(path))) as refused:
        load_checkpoint(checkpoint, container, adamw(container))
    assert not marker.exists()
    if name == "dcp/.metadata":
        assert "posix.system" in str(refused.value)
    pickle.loads(path.read_bytes())   # the payload is live: plain pickle runs it
    assert marker.exists()


def test_items_stored_as_bytes_are_refused(saved, tmp_path):
    checkpoint = shutil.copytree(saved, tmp_path / "checkpoint")
    _rewrite_metadata(checkpoint, lambda m: m.state_dict_metadata.update({"model.extra": BytesStorageMetadata()}))
    container, _, _ = build()
    with pytest.raises(UnsafeCheckpointError, match="'model.extra' is stored as bytes"):
        load_checkpoint(checkpoint, container, None)


def test_old_format_checkpoints_are_found_but_refused(tmp_path):
    marker = tmp_path / "payload-ran"
    legacy = tmp_path / "checkpoints" / "step-0000005"
    legacy.mkdir(parents=True)
    (legacy / "state.pt").write_bytes(pickle.dumps(Payload(marker)))
    assert latest_checkpoint(tmp_path / "checkpoints") == legacy   # so that resuming fails loudly
    container, _, _ = build()
    with pytest.raises(UnsafeCheckpointError, match="old-format checkpoint"):
        load_checkpoint(legacy, container, adamw(container))
    assert not marker.exists()


# ----- across world sizes -----

@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
def test_checkpoints_reshard_between_one_and_two_ranks_and_export_gathers(tmp_path):
    container, policy, _ = build()
    optimizer = adamw(container)
    train_step(policy, optimizer)
    save_checkpoint(tmp_path / "one", 1, container, optimizer, {"note": "one"})
    save_file(full_tensors(container, optimizer), tmp_path / "one.safetensors")

    # two ranks: load one/ and check it, train, save two/, export
    torchrun(str(WORKER), str(tmp_path), timeout=120)

    container, _, _ = build()
    optimizer = adamw(container)
    state = load_checkpoint(tmp_path / "two" / "step-0000002", container, optimizer)
    assert state == {"note": "two", "step": 2}
    expected = load_file(tmp_path / "two.safetensors")
    assert_same(full_tensors(container, optimizer), expected, "two ranks -> one")

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    weights = {f"model/policy.{name}": value for name, value in exported.state_dict().items()}
    assert_same(weights, {k: v for k, v in expected.items() if k.startswith("model/")}, "export")
    assert exported.config.architectures == ["LlamaForCausalLM"]
    assert {"tokenizer.json", "generation_config.json"} <= {p.name for p in (tmp_path / "export").iterdir()}
    assert_lora_export(tmp_path / "lora", lora_policy()[0])
    assert "lm_head.weight" not in load_file(tmp_path / "tied" / "model.safetensors"), "a tied head is written once"
    tied, expected = AutoModelForCausalLM.from_pretrained(tmp_path / "tied"), tied_model()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert_same(tied.state_dict(), expected.state_dict(), "tied export")


# ----- export -----

def assert_lora_export(out: Path, lora) -> None:
    """`out` holds the adapter of `lora` and, in merged/, the model `lora` merges into (merging `lora`)."""
    from peft import get_peft_model_state_dict

    assert (out / "adapter_config.json").exists() and (out / "tokenizer.json").exists()
    assert_same(load_file(out / "adapter_model.safetensors"), get_peft_model_state_dict(lora), "adapter")
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert_same(merged.state_dict(), lora.merge_and_unload().state_dict(), "merged")


def test_export_of_a_lora_model_writes_its_adapter_and_the_merged_model(tmp_path):
    lora, tokenizer = lora_policy()
    out = export_model(lora, tokenizer, tmp_path / "export", merge_lora=True)
    assert_lora_export(out, lora)   # also: merging lora here shows the export left it unmerged
    assert not list(tmp_path.glob(".*.tmp"))


def test_export_of_a_reward_model_reloads_as_a_sequence_classifier(tmp_path):
    backbone, tokenizer = tiny_model_and_tokenizer(seed=0)
    reward = tiny_reward_model(backbone)
    out = export_model(reward, tokenizer, tmp_path / "reward")
    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert_same(reloaded.state_dict(), reward.state_dict(), "reward model")
