"""Token-level helpers shared by everything that generates: left padding and end-of-sequence ids."""

from __future__ import annotations

import torch


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, T] left-padded with `pad_id` to the longest prompt, and the attention mask [B, T]."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention[row, width - len(prompt):] = 1
    return ids.to(device), attention.to(device)


def eos_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS id, then those of the model's generation config, without repeats."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    ids = [i for i in [tokenizer.eos_token_id, *ids] if i is not None]
    if not ids:
        raise ValueError("the tokenizer and the model's generation config define no end-of-sequence token")
    return list(dict.fromkeys(ids))
