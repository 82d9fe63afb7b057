"""Load a causal LM and its tokenizer from a local path or hub id, or build the tiny model."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from alignkit.models.pairwise import PairwiseConfig, PreferenceModel, is_preference_model
from alignkit.models.tiny import TinyConfig, tiny_model_and_tokenizer, tiny_reward_model

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


@dataclass
class ModelConfig:
    """Which model to train. `name` is "tiny", a local directory, or a hub id."""

    name: str = "tiny"                  # "tiny", a local model folder, a finished run directory, or a hub id
    tokenizer: str | None = None        # a different tokenizer folder or hub id; default: the model's
    dtype: str = "float32"     # weights as stored and trained; train.precision=bf16 keeps fp32 masters instead
    attn_implementation: str = "sdpa"   # or "eager", "flash_attention_2" (where installed), ...
    trust_remote_code: bool = False     # run the model repository's own code (only when you ask)
    revision: str | None = None         # hub revision (branch, tag or commit)
    gguf_file: str | None = None        # load this GGUF file from the `name` folder (dequantised)
    lora: dict | None = None   # peft LoraConfig options, e.g. {r: 16, lora_alpha: 32}; trains adapters only
    heads: int = 1             # reward models: K reward heads on one backbone (an ensemble's members)
    pairwise: PairwiseConfig = field(default_factory=PairwiseConfig)  # preference models: the head
    tiny: TinyConfig = field(default_factory=TinyConfig)


class ModelLoadError(RuntimeError):
    pass


def _seeded(build, seed: int = 0):
    """Call `build` with the global torch RNG seeded (new heads start the same every time), then restore it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _pretrained(auto, cfg: ModelConfig, **kw):
    model = _seeded(lambda: auto.from_pretrained(cfg.name, **kw))
    return _plain_copy(model, auto) if cfg.gguf_file else model


def _preference_model(cfg: ModelConfig, **kw):
    if is_preference_model(cfg.name):
        return PreferenceModel.from_pretrained(cfg.name, **kw)
    return PreferenceModel.from_causal_lm(_pretrained(AutoModelForCausalLM, cfg, **kw), cfg.pairwise)


# head -> (build from a checkpoint name, build on the tiny causal LM)
HEADS = {
    "causal_lm": (lambda cfg, **kw: _pretrained(AutoModelForCausalLM, cfg, **kw), lambda lm, cfg: lm),
    "reward": (lambda cfg, **kw: _pretrained(AutoModelForSequenceClassification, cfg, num_labels=cfg.heads, **kw),
               lambda lm, cfg: tiny_reward_model(lm, cfg.heads)),
    "pairwise": (_preference_model, lambda lm, cfg: PreferenceModel.from_causal_lm(lm, cfg.pairwise)),
}


def load_model_and_tokenizer(cfg: ModelConfig, head: str = "causal_lm"):
    """Return (model, tokenizer); the tokenizer always has a pad token.

    `head="reward"` gives a sequence classifier with `cfg.heads` outputs (AutoModelForSequenceClassification,
    num_labels=K) on the same backbone: a scalar reward model, or K reward heads, that plain
    transformers reloads. `head="pairwise"` gives a PreferenceModel (alignkit.models.pairwise): the
    backbone of the causal LM plus a `cfg.pairwise` head, or a saved preference model reloaded.
    """
    if head not in HEADS:
        raise ValueError(f"unknown model head {head!r}; known: {', '.join(HEADS)}")
    if cfg.heads < 1:
        raise ValueError(f"model.heads must be at least 1, got {cfg.heads}")
    if cfg.lora and head == "pairwise":
        raise ModelLoadError("model.lora is not supported for pairwise preference models yet")
    model, tokenizer = _load(replace(cfg, name=resolve_model_path(cfg.name)), head)
    return (with_lora(model, cfg.lora, head) if cfg.lora else model), tokenizer


def resolve_model_path(name: str) -> str:
    """The final model folder of a run directory (`RUN_DIR/model`); other names unchanged.

    Checkpoints hold sharded training state, not a model folder: a run that has not finished has no
    model to load yet (`alignkit.train.checkpoint.restore_weights` reads a checkpoint into a model)."""
    folder = Path(name)
    if (folder / "checkpoints").is_dir() or (folder / "config.yaml").exists():
        if not (folder / "model").is_dir():
            raise ModelLoadError(f"run {name} has no final model yet ({folder / 'model'} is written when "
                                 "training ends); resume it, or read a checkpoint with "
                                 "alignkit.train.checkpoint.restore_weights")
        folder = folder / "model"
    return str(folder) if folder.exists() else name


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
    if cfg.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    if cfg.name == "tiny":
        model, tokenizer = tiny_model_and_tokenizer(cfg.tiny)
        model.set_attn_implementation(cfg.attn_implementation)
        model = HEADS[head][1](model, cfg)
        return (model.to(DTYPES[cfg.dtype]) if cfg.dtype not in ("auto", "float32") else model), tokenizer
    options = dict(trust_remote_code=cfg.trust_remote_code, revision=cfg.revision,
                   attn_implementation=cfg.attn_implementation)
    if cfg.gguf_file:
        options["gguf_file"] = cfg.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.name, **options)
        model = HEADS[head][0](cfg, dtype=DTYPES[cfg.dtype], **options)
    except (OSError, ValueError) as err:
        where = "local directory" if Path(cfg.name).exists() else "hub id (needs network)"
        raise ModelLoadError(f"could not load model {cfg.name!r} as a {where}: {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:  # sequence classifiers find the last token by padding
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _plain_copy(model, auto):
    """A GGUF-loaded model is dequantised but refuses save_pretrained: copy it into a plain one."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = auto.from_config(config, dtype=next(model.parameters()).dtype)
    plain.load_state_dict(model.state_dict())
    return plain
