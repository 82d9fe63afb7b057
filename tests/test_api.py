"""The one-call Python API: keywords are config keys, data can live in memory, the result names the model."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import alignkit
from alignkit.config import ConfigError

PAIRS = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)} for a in range(6) for b in range(4)]


def test_dpo_from_a_list_of_dicts_with_flat_and_loss_keywords(tmp_path):
    result = alignkit.DPO(model="tiny", data=PAIRS, output_dir=str(tmp_path), steps=2, lr=1e-3, beta=0.2,
                          batch_size=8, progress=False).train()
    config = (result.run_dir / "config.yaml").read_text()
    assert "beta: 0.2" in config and "lr: 0.001" in config and "steps: 2" in config
    assert "eval/reward_accuracy" in result.metrics
    model = AutoModelForCausalLM.from_pretrained(result.model_path)
    assert sum(p.numel() for p in model.parameters()) > 0
    again = alignkit.DPO(model="tiny", data=PAIRS, output_dir=str(tmp_path), train={"steps": 1, "progress": False})
    assert again.options["data"]["train"] == alignkit.DPO(data=PAIRS, output_dir=str(tmp_path)).options["data"]["train"]


def test_kto_and_sft_take_in_memory_data_and_a_model_object(tmp_path):
    from alignkit.models import tiny_model_and_tokenizer

    ratings = [{"prompt": f"{i}=", "completion": str(i), "label": i % 2 == 0} for i in range(16)]
    kto = alignkit.KTO(data=ratings, output_dir=str(tmp_path), steps=1, progress=False, desirable_weight=1.5).train()
    assert "desirable_weight: 1.5" in (kto.run_dir / "config.yaml").read_text()
    model, tokenizer = tiny_model_and_tokenizer(seed=3)
    demos = [{"prompt": f"{i}=", "completion": str(i)} for i in range(16)]
    sft = alignkit.SFT(model=model, tokenizer=tokenizer, data=demos, output_dir=str(tmp_path), steps=1,
                       progress=False).train()
    saved = AutoModelForCausalLM.from_pretrained(sft.model_path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in saved.state_dict().items())


def test_grpo_with_a_reward_spec_and_rl_keywords(tmp_path):
    rule = tmp_path / "r.py"
    rule.write_text("def length(completions, **kwargs):\n    return [float(len(c)) for c in completions]\n")
    prompts = [{"prompt": f"{i}+1="} for i in range(12)]
    result = alignkit.GRPO(data=prompts, reward=f"rule:{rule}:length", output_dir=str(tmp_path), steps=1,
                           prompts_per_step=2, group_size=2, max_new_tokens=3, progress=False).train()
    rows = [line for line in (result.run_dir / "metrics.jsonl").read_text().splitlines() if "train/reward" in line]
    assert len(rows) == 1 and (result.model_path / "config.json").exists()


def test_unknown_and_ambiguous_keywords_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown option 'learning_rate'"):
        alignkit.DPO(learning_rate=1e-5)
    with pytest.raises(ConfigError, match="'seed' is ambiguous.*train.seed"):
        alignkit.DPO(seed=1)
    assert alignkit.DPO(train={"seed": 1}).options["train"]["seed"] == 1


def test_one_call_does_not_leak_its_data_into_the_next():
    first = alignkit.KTO(data="a.jsonl")
    second = alignkit.KTO()
    assert first.options["data"]["train"] == "a.jsonl" and "train" not in second.options["data"]
    assert alignkit.KTO.defaults == {"loss": {"name": "kto"}, "data": {"kind": "rating"}}
