"""LoRA through peft: adapters train, the base stays frozen, checkpoints hold adapters and restore."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignkit.config import build
from alignkit.models import ModelConfig, ModelLoadError, load_model_and_tokenizer, naive_token_logprobs, token_logprobs
from alignkit.train import RunConfig, train
from alignkit.train.checkpoint import latest_checkpoint, restore_weights

LORA = {"r": 4, "lora_alpha": 8}


def test_lora_trains_adapters_only_and_checkpoints_restore_them(tmp_path):
    model, tok = load_model_and_tokenizer(ModelConfig(lora=LORA))
    frozen = {k: v.clone() for k, v in model.named_parameters() if not v.requires_grad}
    trainable = {k: v.clone() for k, v in model.named_parameters() if v.requires_grad}
    assert trainable and all("lora_" in k for k in trainable)
    cfg = build(RunConfig, {"output_dir": str(tmp_path), "model": {"lora": LORA},
                            "data": {"task_size": 32, "eval_size": 8},
                            "train": {"steps": 3, "batch_size": 8, "lr": 1e-2, "progress": False,
                                      "merge_lora": True}})
    result = train(cfg, "preference", model=model, tokenizer=tok)
    now = dict(model.named_parameters())
    assert all(torch.equal(now[k], v) for k, v in frozen.items())
    assert any(not torch.equal(now[k], v) for k, v in trainable.items())
    assert (result.run.path / "model" / "adapter_model.safetensors").exists(), "the final model is the adapter"
    merged = AutoModelForCausalLM.from_pretrained(result.run.path / "model" / "merged")
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    for name, value in merged.state_dict().items():
        torch.testing.assert_close(value, expected[name], msg=name)
    fresh, _ = load_model_and_tokenizer(ModelConfig(lora=LORA))
    restore_weights(fresh, latest_checkpoint(result.run.checkpoints))
    for name, value in fresh.named_parameters():
        assert torch.equal(value, now[name]), name


def test_logprobs_see_the_adapters():
    model, _ = load_model_and_tokenizer(ModelConfig(lora=LORA))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids = torch.randint(4, 100, (2, 9))
    mask, score = torch.ones_like(ids), torch.zeros_like(ids)
    score[:, 4:] = 1
    torch.testing.assert_close(token_logprobs(model, ids, mask, score), naive_token_logprobs(model, ids, mask, score),
                               atol=1e-5, rtol=1e-5)


def test_bad_lora_options_are_reported():
    with pytest.raises(ModelLoadError, match="model.lora"):
        load_model_and_tokenizer(ModelConfig(lora={"rank": 4}))
