"""Load a causal LM and its tokenizer from a local path or hub id, or build the tiny model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.models.tiny import TinyConfig, tiny_model_and_tokenizer

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
    tiny: TinyConfig = field(default_factory=TinyConfig)


class ModelLoadError(RuntimeError):
    pass


def load_model_and_tokenizer(cfg: ModelConfig):
    """Return (model, tokenizer); the tokenizer always has a pad token."""
    if cfg.name == "tiny":
        return tiny_model_and_tokenizer(cfg.tiny)
    if cfg.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    options = dict(trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    if cfg.gguf_file:
        options["gguf_file"] = cfg.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.name, **options)
        model = AutoModelForCausalLM.from_pretrained(cfg.name, dtype=DTYPES[cfg.dtype], **options)
    except (OSError, ValueError) as err:
        where = "local directory" if Path(cfg.name).exists() else "hub id (needs network)"
        raise ModelLoadError(f"could not load model {cfg.name!r} as a {where}: {err}") from err
    if cfg.gguf_file:
        model = _plain_copy(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _plain_copy(model):
    """A GGUF-loaded model is dequantised but refuses save_pretrained: copy it into a plain one."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    plain.load_state_dict(model.state_dict())
    return plain
