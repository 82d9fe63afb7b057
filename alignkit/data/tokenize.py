"""Turn records into token ids with a prompt/completion split, and pad them into batches.

Templates: "chat" uses the tokenizer's chat template (the prompt is rendered with the generation
prompt; the completion is whatever the full conversation adds after it). "plain" writes the
prompt as given (chat messages as "role: content" lines followed by "assistant: "), prefixed by
BOS when the tokenizer has one, and the completion followed by EOS. "auto" picks "chat" when the
tokenizer has a template.

Truncation keeps the end of the prompt (at most `max_prompt_length` tokens) and cuts the end of
the completion so the whole fits in `max_length`; truncated records are counted, not dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

Prompt = str | list[dict]


@dataclass
class TokenizeConfig:
    max_length: int = 512           # tokens of prompt and completion together; longer examples are cut
    max_prompt_length: int = 256    # tokens of the prompt (cut from the left)
    template: str = "auto"          # chat (the tokenizer's template), plain, or auto: chat where there is one

    RANGES = {"max_length": (2, None), "max_prompt_length": (1, None)}
    CHOICES = {"template": ("auto", "chat", "plain")}


@dataclass(frozen=True)
class Encoded:
    prompt: list[int]
    completion: list[int]

    def __len__(self) -> int:
        return len(self.prompt) + len(self.completion)


def _as_messages(prompt: Prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


class Encoder:
    """Encodes (prompt, completion) pairs for one tokenizer and counts truncations."""

    def __init__(self, tokenizer, cfg: TokenizeConfig | None = None):
        self.tokenizer = tokenizer
        self.cfg = cfg or TokenizeConfig()
        if self.cfg.max_prompt_length >= self.cfg.max_length:
            raise ValueError("max_prompt_length must be smaller than max_length")
        template = self.cfg.template
        if template == "auto":
            template = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
        if template not in ("chat", "plain"):
            raise ValueError(f"template must be auto, chat or plain, got {template!r}")
        if template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' asked for, but the tokenizer has no chat template")
        self.template = template
        self.truncated = 0

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _render(self, prompt: Prompt, completion: str | None) -> tuple[str, str]:
        if self.template == "chat":
            messages = _as_messages(prompt)
            head = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            if completion is None:
                return head, ""
            full = self.tokenizer.apply_chat_template(
                messages + [{"role": "assistant", "content": completion}], tokenize=False)
            tail = full[len(head):] if full.startswith(head) else completion + self.tokenizer.eos_token
            return head, tail
        if isinstance(prompt, str):
            head = prompt
        else:
            head = "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant: "
        bos = self.tokenizer.bos_token or ""
        tail = "" if completion is None else completion + (self.tokenizer.eos_token or "")
        return bos + head, tail

    def encode(self, prompt: Prompt, completion: str | None = None) -> Encoded:
        head, tail = self._render(prompt, completion)
        prompt_ids, completion_ids = self._ids(head), self._ids(tail)
        cut_prompt = prompt_ids[-self.cfg.max_prompt_length:]
        cut_completion = completion_ids[: self.cfg.max_length - len(cut_prompt)]
        if len(cut_prompt) < len(prompt_ids) or len(cut_completion) < len(completion_ids):
            self.truncated += 1
        return Encoded(cut_prompt, cut_completion)


@dataclass
class Batch:
    """Right-padded token ids; score_mask marks completion tokens (the ones losses see)."""

    input_ids: Tensor
    attention_mask: Tensor
    score_mask: Tensor

    def to(self, device) -> Batch:
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.score_mask)))

    @property
    def lengths(self) -> Tensor:
        """Completion token counts per row."""
        return self.score_mask.sum(1)


def collate(encoded: list[Encoded], pad_id: int) -> Batch:
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    score = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, e in enumerate(encoded):
        n, p = len(e), len(e.prompt)
        ids[row, :n] = torch.tensor(e.prompt + e.completion, dtype=torch.long)
        attention[row, :n] = 1
        score[row, p:n] = 1
    return Batch(ids, attention, score)
