"""A small randomly initialised Llama-style model and a character tokenizer, built offline.

For tests, demos and experiments: nothing is downloaded. The tokenizer maps every printable
ASCII character to one token, so any ASCII text round-trips; other characters become <unk>.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
CHARACTERS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]

# Roles are marked by one special token each; an assistant turn ends with the EOS token.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}"
    "{% if m.role == 'assistant' %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass
class TinyConfig:
    """Size of the tiny model; the defaults give about 0.1M parameters."""

    vocab_size: int = 128          # tokens (at least the characters and special tokens)
    hidden_size: int = 64          # model width
    intermediate_size: int = 128   # MLP width
    num_layers: int = 2            # decoder layers
    num_heads: int = 4             # attention heads
    num_kv_heads: int = 2          # key/value heads (grouped-query attention)
    max_positions: int = 512       # longest sequence
    chat_template: bool = False    # give the tokenizer a small chat template
    seed: int = 0                  # weight initialisation


def tiny_tokenizer(vocab_size: int = 128, chat_template: bool = False) -> PreTrainedTokenizerFast:
    """Character tokenizer padded with unused tokens up to `vocab_size`."""
    tokens = SPECIAL_TOKENS + ROLE_TOKENS + CHARACTERS
    if vocab_size < len(tokens):
        raise ValueError(f"tiny tokenizer needs vocab_size >= {len(tokens)}")
    tokens += [f"<unused{i}>" for i in range(vocab_size - len(tokens))]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(".|\n"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
        eos_token="</s>", additional_special_tokens=ROLE_TOKENS,
    )
    if chat_template:
        tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def tiny_model(config: TinyConfig | None = None, **overrides) -> LlamaForCausalLM:
    """A randomly initialised LlamaForCausalLM of the given size, seeded for reproducibility."""
    cfg = config or TinyConfig()
    for key, value in overrides.items():
        setattr(cfg, key, value)
    llama = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_positions, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        return LlamaForCausalLM(llama)


def tiny_model_and_tokenizer(config: TinyConfig | None = None, **overrides):
    cfg = config or TinyConfig()
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return tiny_model(cfg), tiny_tokenizer(cfg.vocab_size, cfg.chat_template)


def tiny_reward_model(backbone: LlamaForCausalLM, heads: int = 1) -> LlamaForSequenceClassification:
    """A reward model on the backbone of `backbone` with a new (seeded) scoring head of `heads`
    outputs: one scalar reward, or K rewards whose rows start from different random values."""
    if heads < 1:
        raise ValueError(f"a reward model needs at least one head, got {heads}")
    fields = {k: v for k, v in backbone.config.to_dict().items() if k not in ("id2label", "label2id")}
    config = LlamaConfig.from_dict({**fields, "num_labels": heads})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForSequenceClassification(config)
    model.model.load_state_dict(backbone.model.state_dict())
    return model
