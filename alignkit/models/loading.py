"""Load a causal LM and its tokenizer from a local path or hub id, or build the tiny model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from alignkit.models.tiny import TinyConfig, tiny_model_and_tokenizer, tiny_reward_model

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


@dataclass
class ModelConfig:
    """Which model to train. `name` is "tiny", a local directory, or a hub id."""

    name: str = "tiny"
    tokenizer: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    revision: str | None = None
    gguf_file: str | None = None
    lora: dict | None = None   # peft LoraConfig options, e.g. {r: 16, lora_alpha: 32}; trains adapters only
    tiny: TinyConfig = field(default_factory=TinyConfig)


class ModelLoadError(RuntimeError):
    pass


HEADS = {
    "causal_lm": lambda name, **kw: AutoModelForCausalLM.from_pretrained(name, **kw),
    "reward": lambda name, **kw: AutoModelForSequenceClassification.from_pretrained(name, num_labels=1, **kw),
}


def load_model_and_tokenizer(cfg: ModelConfig, head: str = "causal_lm"):
    """Return (model, tokenizer); the tokenizer always has a pad token.

    `head="reward"` gives a sequence classifier with one output (AutoModelForSequenceClassification,
    num_labels=1) on the same backbone: a scalar reward model that plain transformers reloads.
    """
    model, tokenizer = _load(cfg, head)
    return (with_lora(model, cfg.lora, head) if cfg.lora else model), tokenizer


def with_lora(model, options: dict, head: str = "causal_lm"):
    """Wrap `model` with LoRA adapters (peft); only the adapters (and a reward head) then train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ModelLoadError("model.lora needs peft: pip install 'alignkit[peft]'") from None
    defaults = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}
    if head == "reward":
        defaults["modules_to_save"] = ["score"]
    try:
        return get_peft_model(model, LoraConfig(**{**defaults, **options}))
    except (TypeError, ValueError) as err:
        raise ModelLoadError(f"model.lora: {err}") from err


def _load(cfg: ModelConfig, head: str):
    if cfg.name == "tiny":
        model, tokenizer = tiny_model_and_tokenizer(cfg.tiny)
        return (tiny_reward_model(model) if head == "reward" else model), tokenizer
    if cfg.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    options = dict(trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    if cfg.gguf_file:
        options["gguf_file"] = cfg.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.name, **options)
        model = HEADS[head](cfg.name, dtype=DTYPES[cfg.dtype], **options)
    except (OSError, ValueError) as err:
        where = "local directory" if Path(cfg.name).exists() else "hub id (needs network)"
        raise ModelLoadError(f"could not load model {cfg.name!r} as a {where}: {err}") from err
    if cfg.gguf_file:
        model = _plain_copy(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:  # sequence classifiers find the last token by padding
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _plain_copy(model):
    """A GGUF-loaded model is dequantised but refuses save_pretrained: copy it into a plain one."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    plain.load_state_dict(model.state_dict())
    return plain
