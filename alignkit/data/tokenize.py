"""Turn records into token ids with a prompt/completion split, and pad them into batches.

Templates: "chat" uses the tokenizer's chat template (the prompt is rendered with the generation
prompt; the completion is whatever the full conversation adds after it). "plain" writes the
prompt as given (chat messages as "role: content" lines followed by "assistant: "), prefixed by
BOS when the tokenizer has one, and the completion followed by EOS. "auto" picks "chat" when the
tokenizer has a template. An empty prompt (plain text rows) is BOS alone, whatever the template.

A completion may be a list of chat messages (several assistant turns, tool calls and tool results):
the assistant turns are trained (all of them, or the last with `assistant_turns="last"`) and the
other messages are context. With a template that marks assistant text with `{% generation %}`, its
assistant mask says which tokens those are; otherwise the conversation is rendered turn by turn,
each turn being what the template adds to the text of the turns before it. Where the template does
not extend the earlier text, that turn is appended without it (EOS after assistant text) and the
record is counted in `Encoder.appended`.

Truncation keeps the end of the prompt (at most `max_prompt_length` tokens) and cuts the end of
the completion so the whole fits in `max_length`; truncated records are counted, not dropped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import torch
from torch import Tensor

Prompt = str | list[dict]
Completion = str | list[dict]
Piece = tuple[str, bool]  # text, and whether its tokens are trained
GENERATION_MARK = re.compile(r"{%-?\s*generation\s*-?%}")


CHARS_PER_TOKEN = 32   # more than any tokenizer's longest usual token: a safe bound on characters kept


@dataclass
class TokenizeConfig:
    max_length: int = 512           # tokens of prompt and completion together; longer examples are cut
    max_prompt_length: int = 256    # tokens of the prompt (cut from the left)
    template: str = "auto"          # chat (the tokenizer's template), plain, or auto: chat where there is one
    assistant_turns: str = "all"    # completions given as chat messages: train every assistant turn, or the last

    RANGES = {"max_length": (2, None), "max_prompt_length": (1, None)}
    CHOICES = {"template": ("auto", "chat", "plain"), "assistant_turns": ("all", "last")}


@dataclass(frozen=True)
class Encoded:
    """Prompt tokens, then completion tokens. `mask` (one 0/1 per completion token) marks the trained
    ones where some are context (a user turn between two assistant turns); None: all are trained."""

    prompt: list[int]
    completion: list[int]
    mask: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.prompt) + len(self.completion)

    @property
    def trained(self) -> list[int]:
        """One 0/1 per completion token: 1 where a loss sees it."""
        return list(self.mask) if self.mask is not None else [1] * len(self.completion)


def _as_messages(prompt: Prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def message_text(message: dict) -> str:
    """A message's content, with its tool calls as JSON (plain template)."""
    calls = message.get("tool_calls")
    return (message.get("content") or "") + (json.dumps(calls) if calls else "")


def trained_turns(completion: list[dict], assistant_turns: str) -> set[int]:
    """Positions in `completion` of the assistant turns to train: all, or the last."""
    turns = [k for k, message in enumerate(completion) if message["role"] == "assistant"]
    return set(turns if assistant_turns == "all" else turns[-1:])


class Encoder:
    """Encodes (prompt, completion) pairs for one tokenizer; counts truncated records, and records whose
    completion was appended without the chat template (`appended`)."""

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
        if self.cfg.assistant_turns not in ("all", "last"):
            raise ValueError(f"assistant_turns must be all or last, got {self.cfg.assistant_turns!r}")
        self.template = template
        self.truncated = 0
        self.appended = 0
        self.cut_before_tokenizing = 0   # texts longer than any token limit could keep

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _chat(self, messages: list[dict], generation: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False)

    def _eos(self) -> str:
        return self.tokenizer.eos_token or ""

    def _render(self, prompt: Prompt, completion: str | None) -> tuple[str, str]:
        tail = "" if completion is None else completion + self._eos()
        if prompt == "":  # plain text: no template, the whole text is the completion
            return self.tokenizer.bos_token or "", tail
        if self.template == "chat":
            messages = _as_messages(prompt)
            head = self._chat(messages, generation=True)
            if completion is None:
                return head, ""
            full = self._chat(messages + [{"role": "assistant", "content": completion}])
            if not full.startswith(head):
                self.appended += 1
                return head, tail
            return head, full[len(head):]
        return (self.tokenizer.bos_token or "") + self._plain_head(prompt), tail

    @staticmethod
    def _plain_head(prompt: Prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        return "".join(f"{m['role']}: {message_text(m)}\n" for m in prompt) + "assistant: "

    def encode(self, prompt: Prompt, completion: Completion | None = None) -> Encoded:
        """Token ids of `prompt` and `completion` (a text, or chat messages whose assistant turns are trained).

        Texts far longer than the token limits allow are cut first (`CHARS_PER_TOKEN` characters per
        token kept: the prompt's end, the completion's start), so a 10 MB record costs what a long one
        does; the tokens kept are the ones the limits would keep anyway."""
        prompt, completion = self._bounded(prompt, self.cfg.max_prompt_length, True), \
            self._bounded(completion, self.cfg.max_length, False)
        if not isinstance(completion, list):
            head, tail = self._render(prompt, completion)
            return self._cut(self._ids(head), self._ids(tail), None)
        if self.template == "chat" and GENERATION_MARK.search(self.tokenizer.chat_template):
            return self._split(*self._masked_turns(prompt, completion))
        pieces = self._chat_pieces(prompt, completion) if self.template == "chat" else \
            self._plain_pieces(prompt, completion)
        ids, mask = [], []
        for text, trained in pieces:
            piece = self._ids(text)
            ids += piece
            mask += [int(trained)] * len(piece)
        return self._split(ids, mask)

    def _bounded(self, value, tokens: int, keep_end: bool):
        """`value` (a text, messages or None) with every text cut to CHARS_PER_TOKEN x `tokens` characters."""
        limit = CHARS_PER_TOKEN * tokens
        if isinstance(value, str):
            if len(value) <= limit:
                return value
            self.cut_before_tokenizing += 1
            return value[-limit:] if keep_end else value[:limit]
        if isinstance(value, list):
            return [{**m, "content": self._bounded(m["content"], tokens, keep_end)} if isinstance(m.get("content"), str)
                    else m for m in value]
        return value

    def _masked_turns(self, prompt: Prompt, completion: list[dict]) -> tuple[list[int], list[int]]:
        """Ids of the whole chat and the template's assistant mask, keeping the turns to train."""
        messages = _as_messages(prompt)
        rendered = self.tokenizer.apply_chat_template(
            messages + completion, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = list(rendered["input_ids"]), list(rendered["assistant_masks"])
        runs = _runs(mask, start=len(self._ids(self._chat(messages))))  # the prompt's own turns are context
        trained = [0] * len(ids)
        for begin, end in runs if self.cfg.assistant_turns == "all" else runs[-1:]:
            trained[begin:end] = [1] * (end - begin)
        return ids, trained

    def _chat_pieces(self, prompt: Prompt, completion: list[dict]) -> list[Piece]:
        """The chat rendered turn by turn: each piece is what the template adds to the text before it."""
        conversation = _as_messages(prompt) + completion
        start, trained = len(conversation) - len(completion), trained_turns(completion, self.cfg.assistant_turns)
        pieces, done, appended = [], "", False
        for position in range(start, len(conversation)):
            message, fits = conversation[position], True
            if message["role"] == "assistant":  # the generation prompt before it is context
                context = self._chat(conversation[:position], generation=True)
                fits = context.startswith(done)
                pieces.append((context[len(done):] if fits else "", False))
                done = context if fits else done
            full = self._chat(conversation[: position + 1])
            fits = fits and full.startswith(done)
            pieces.append((full[len(done):] if fits else self._appended_text(message), position - start in trained))
            appended, done = appended or not fits, full
        self.appended += appended
        return pieces

    def _appended_text(self, message: dict) -> str:
        text = message_text(message)
        return text + self._eos() if message["role"] == "assistant" else f"{message['role']}: {text}\n"

    def _plain_pieces(self, prompt: Prompt, completion: list[dict]) -> list[Piece]:
        """Plain template: the prompt as usual, then each assistant turn's text and EOS (after an
        "assistant: " cue but for the first), other messages as "role: content" lines."""
        trained = trained_turns(completion, self.cfg.assistant_turns)
        pieces = [((self.tokenizer.bos_token or "") + self._plain_head(prompt), False)]
        for position, message in enumerate(completion):
            if message["role"] == "assistant" and position:
                pieces.append(("assistant: ", False))
            pieces.append((self._appended_text(message), position in trained))
        return pieces

    def _split(self, ids: list[int], mask: list[int]) -> Encoded:
        """The prompt is everything before the first trained token."""
        first = mask.index(1) if 1 in mask else len(ids)
        completion_mask = mask[first:]
        return self._cut(ids[:first], ids[first:], None if all(completion_mask) else completion_mask)

    def _cut(self, prompt_ids: list[int], completion_ids: list[int], mask: list[int] | None) -> Encoded:
        cut_prompt = prompt_ids[-self.cfg.max_prompt_length:]
        cut_completion = completion_ids[: self.cfg.max_length - len(cut_prompt)]
        if len(cut_prompt) < len(prompt_ids) or len(cut_completion) < len(completion_ids):
            self.truncated += 1
        cut_mask = None if mask is None else tuple(mask[: len(cut_completion)])
        return Encoded(cut_prompt, cut_completion, cut_mask)


def _runs(mask: list[int], start: int = 0) -> list[tuple[int, int]]:
    """(begin, end) of each run of 1s in `mask` from `start` on."""
    runs, begin = [], None
    for position in range(start, len(mask) + 1):
        on = position < len(mask) and mask[position] == 1
        if on and begin is None:
            begin = position
        elif not on and begin is not None:
            runs.append((begin, position))
            begin = None
    return runs


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
        score[row, p:n] = torch.tensor(e.trained, dtype=torch.long)
    return Batch(ids, attention, score)
