"""Typed training records, and the parsers that build them from raw rows (one per record kind)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from alignkit.registry import Registry

Message = dict[str, Any]
Prompt = str | list[Message]
Completion = str | list[Message]  # a text, or chat messages (assistant turns, tool calls and results)


class FieldError(ValueError):
    """One field of a raw row is missing or unusable; the loader adds the file and line."""

    def __init__(self, field: str, message: str):
        super().__init__(field, message)
        self.field = field
        self.message = message

    def __str__(self) -> str:
        return f"field {self.field!r}: {self.message}"


@dataclass(frozen=True)
class Demonstration:
    prompt: Prompt          # "" for plain text (a `text` row): the whole text is the completion
    completion: Completion
    index: int = 0
    origin: str = ""


@dataclass(frozen=True)
class Comparison:
    prompt: Prompt
    chosen: Completion
    rejected: Completion
    margin: float | None = None
    subset: str | None = None
    index: int = 0
    origin: str = ""


@dataclass(frozen=True)
class Rating:
    prompt: Prompt
    completion: Completion
    label: bool
    index: int = 0
    origin: str = ""


@dataclass(frozen=True)
class PromptRecord:
    prompt: Prompt
    reference: str | None = None
    index: int = 0
    origin: str = ""
    columns: dict = field(default_factory=dict, compare=False)  # the record's other fields, for batch rewards


@dataclass(frozen=True)
class Judgement:
    """A judge's worked comparison of answers a and b: reasoning, then a verdict A, B or tie."""

    prompt: Prompt
    a: str
    b: str
    verdict: str
    reasoning: str = ""
    index: int = 0
    origin: str = ""


@dataclass(frozen=True)
class BestOfN:
    """A prompt with correct completions and incorrect ones (RewardBench 2's best-of-4 shape)."""

    prompt: Prompt
    chosen: tuple[str, ...]
    rejected: tuple[str, ...]
    subset: str | None = None
    index: int = 0
    origin: str = ""


VERDICTS = ("A", "B", "tie")
RECORD_KINDS = Registry("record kind")


@RECORD_KINDS.register(
    "demonstration",
    summary="a prompt and a completion to imitate (prompt/completion, a chat `messages` list, or `text`)",
    record_type=Demonstration,
)
def parse_demonstration(raw: dict[str, Any]) -> Demonstration:
    if raw.get("prompt") is None and raw.get("messages") is not None:
        return _demonstration_from_messages(raw["messages"])
    if raw.get("prompt") is None and raw.get("completion") is None and raw.get("text") is not None:
        return Demonstration("", _text(raw, "text"))
    return Demonstration(_prompt(raw), _reply("completion", _completion(raw, "completion")))


@RECORD_KINDS.register(
    "comparison",
    summary="a prompt with a chosen and a rejected completion (optional margin or scores, subset)",
    record_type=Comparison,
)
def parse_comparison(raw: dict[str, Any]) -> Comparison:
    chosen, rejected = _completion(raw, "chosen"), _completion(raw, "rejected")
    if raw.get("prompt") is None:
        prompt, chosen, rejected = _implicit_prompt(chosen, rejected)
    else:
        prompt, chosen, rejected = _prompt(raw), _reply("chosen", chosen), _reply("rejected", rejected)
    if _same(chosen, rejected):
        raise FieldError("rejected", "is the same text as 'chosen'")
    margin = _number(raw, "margin")
    scores = _number(raw, "score_chosen"), _number(raw, "score_rejected")
    if margin is None and None not in scores:
        margin = scores[0] - scores[1]
    return Comparison(prompt, chosen, rejected, margin, _optional_text(raw, "subset"))


@RECORD_KINDS.register(
    "rating",
    summary="a prompt and a completion labelled good (true) or bad (false)",
    record_type=Rating,
)
def parse_rating(raw: dict[str, Any]) -> Rating:
    return Rating(_prompt(raw), _reply("completion", _completion(raw, "completion")), _label(raw))


@RECORD_KINDS.register(
    "prompt",
    summary="a prompt alone, with an optional reference answer",
    record_type=PromptRecord,
)
def parse_prompt(raw: dict[str, Any]) -> PromptRecord:
    columns = {k: v for k, v in raw.items() if k not in ("prompt", "messages", "reference")}
    return PromptRecord(_prompt(raw), _optional_text(raw, "reference"), columns=columns)


@RECORD_KINDS.register(
    "judgement",
    summary="a prompt, answers a and b, a verdict (A, B or tie) and optional reasoning (judge training)",
    record_type=Judgement,
)
def parse_judgement(raw: dict[str, Any]) -> Judgement:
    verdict = _text(raw, "verdict").strip()
    canonical = {v.lower(): v for v in VERDICTS}.get(verdict.lower())
    if canonical is None:
        raise FieldError("verdict", f"expected one of {', '.join(VERDICTS)}, got {verdict!r}")
    reasoning = _optional_text(raw, "reasoning") or ""
    return Judgement(_prompt(raw), _text(raw, "a"), _text(raw, "b"), canonical, reasoning)


@RECORD_KINDS.register(
    "best_of_n",
    summary="a prompt, a list of correct (`chosen`) and a list of incorrect (`rejected`) completions",
    record_type=BestOfN,
)
def parse_best_of_n(raw: dict[str, Any]) -> BestOfN:
    chosen, rejected = _text_list(raw, "chosen"), _text_list(raw, "rejected")
    return BestOfN(_prompt(raw), chosen, rejected, _optional_text(raw, "subset"))


def _text_list(raw: dict[str, Any], field: str) -> tuple[str, ...]:
    value = _required(raw, field)
    if not isinstance(value, list) or not value:
        raise FieldError(field, f"expected a non-empty list of strings, got {_describe(value)}")
    for position, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise FieldError(field, f"item {position}: expected a non-empty string, got {type_name(item)}")
    return tuple(value)


# CSV cells are all strings: these fields get converted before parsing, and blank optional cells dropped.
TRUE_WORDS, FALSE_WORDS = {"true", "1", "yes"}, {"false", "0", "no"}
OPTIONAL_FIELDS = {"margin", "score_chosen", "score_rejected", "subset", "reference", "reasoning"}


def _float_from_text(field: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise FieldError(field, f"expected a number, got {text!r}") from None


def _bool_from_text(field: str, text: str) -> bool:
    word = text.strip().lower()
    if word not in TRUE_WORDS | FALSE_WORDS:
        raise FieldError(field, f"expected true/false, yes/no or 1/0, got {text!r}")
    return word in TRUE_WORDS


TEXT_CONVERTERS = {
    "margin": _float_from_text,
    "score_chosen": _float_from_text,
    "score_rejected": _float_from_text,
    "label": _bool_from_text,
}


def from_text_cells(raw: dict[str, Any]) -> dict[str, Any]:
    """Typed values for a row of strings (CSV): numbers, booleans; a blank optional cell means absent."""
    row = {}
    for name, value in raw.items():
        if not isinstance(value, str):
            row[name] = value
        elif name in OPTIONAL_FIELDS and not value.strip():
            continue
        elif name in TEXT_CONVERTERS:
            row[name] = TEXT_CONVERTERS[name](name, value)
        else:
            row[name] = value
    return row


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _required(raw: dict[str, Any], field: str) -> Any:
    if raw.get(field) is None:
        raise FieldError(field, "missing")
    return raw[field]


def _text(raw: dict[str, Any], field: str) -> str:
    return _non_empty(field, _required(raw, field))


def _non_empty(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise FieldError(field, f"expected a string, got {type_name(value)}")
    if not value.strip():
        raise FieldError(field, "is empty")
    return value


def _optional_text(raw: dict[str, Any], field: str) -> str | None:
    value = raw.get(field)
    if value is not None and not isinstance(value, str):
        raise FieldError(field, f"expected a string, got {type_name(value)}")
    return value


def _prompt(raw: dict[str, Any]) -> Prompt:
    value = _required(raw, "prompt")
    if isinstance(value, list):
        return _messages("prompt", value)
    if not isinstance(value, str):
        raise FieldError("prompt", f"expected a string or a list of chat messages, got {type_name(value)}")
    return _non_empty("prompt", value)


def _messages(field: str, value: Any) -> list[Message]:
    """A non-empty list of chat messages: a string "role", and a string "content" (or a null one beside
    "tool_calls"). Other keys (tool_calls, name, tool_call_id...) pass through to the chat template;
    null ones are dropped (tables give every message every column)."""
    if not isinstance(value, list) or not value:
        raise FieldError(field, f"expected a non-empty list of chat messages, got {_describe(value)}")
    return [_message(field, position, message) for position, message in enumerate(value)]


def _message(field: str, position: int, message: Any) -> Message:
    if not isinstance(message, dict):
        raise FieldError(field, f"message {position}: expected an object, got {type_name(message)}")
    if not isinstance(message.get("role"), str):
        raise FieldError(field, f"message {position}: expected a string 'role', got {type_name(message.get('role'))}")
    calls = message.get("tool_calls")
    if calls is not None and (not isinstance(calls, list) or not calls):
        raise FieldError(field, f"message {position}: expected a non-empty list 'tool_calls', got {_describe(calls)}")
    content = message.get("content")
    if not isinstance(content, str) and not (content is None and calls):
        raise FieldError(field, f"message {position}: expected a string 'content', got {type_name(content)}")
    kept = {key: item for key, item in message.items() if item is not None}
    return {"role": message["role"], "content": content, **kept}


def _describe(value: Any) -> str:
    return "an empty list" if value == [] else type_name(value)


def _completion(raw: dict[str, Any], field: str) -> Completion:
    """A non-empty text or a list of chat messages (checked, not yet split from any prompt)."""
    value = _required(raw, field)
    return _messages(field, value) if isinstance(value, list) else _non_empty(field, value)


def _reply(field: str, value: Completion) -> Completion:
    """A completion as records hold it: one plain assistant message becomes its text, so single-turn chat
    data reads like text data; longer ones (tool calls, several turns) stay messages."""
    if isinstance(value, str):
        return value
    if not any(message["role"] == "assistant" for message in value):
        raise FieldError(field, "has no message with role 'assistant'")
    if len(value) == 1 and set(value[0]) == {"role", "content"} and value[0]["role"] == "assistant":
        return _non_empty(field, value[0]["content"])
    return value


def _same(a: Completion, b: Completion) -> bool:
    return a.strip() == b.strip() if isinstance(a, str) and isinstance(b, str) else a == b


def _implicit_prompt(chosen: Completion, rejected: Completion) -> tuple[Prompt, Completion, Completion]:
    """TRL's implicit prompt: with no `prompt`, it is what chosen and rejected share at their start (their
    leading messages, or for texts their common prefix up to a whitespace, which starts the completions)."""
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise FieldError("prompt", "missing, and 'chosen' and 'rejected' are not both texts or both messages")
    shared = _shared_messages(chosen, rejected) if isinstance(chosen, list) else _shared_text(chosen, rejected)
    if not shared:
        raise FieldError("prompt", "missing")  # and no implicit prompt: chosen and rejected share no start
    chosen, rejected = chosen[len(shared):], rejected[len(shared):]
    for name, rest in (("chosen", chosen), ("rejected", rejected)):
        if not rest or (isinstance(rest, str) and not rest.strip()):
            raise FieldError(name, "has nothing after the prompt it shares with the other completion")
    return shared, _reply("chosen", chosen), _reply("rejected", rejected)


def _shared_length(a: list | str, b: list | str) -> int:
    """How many leading items (messages, characters) `a` and `b` have in common."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _shared_messages(a: list[Message], b: list[Message]) -> list[Message]:
    return a[:_shared_length(a, b)]


def _shared_text(a: str, b: str) -> str:
    count = _shared_length(a, b)
    cut = max((i for i in range(count + 1) if i < len(a) and a[i].isspace()), default=0)
    prompt = a[:cut]
    return prompt if prompt.strip() else ""


def _demonstration_from_messages(value: Any) -> Demonstration:
    """A chat: the prompt is the messages before the first assistant turn; the rest is the completion."""
    messages = _messages("messages", value)
    if messages[-1]["role"] != "assistant":
        got = messages[-1]["role"]
        raise FieldError("messages", f"the last message must have role 'assistant', got {got!r}")
    first = next(i for i, message in enumerate(messages) if message["role"] == "assistant")
    if not first:
        raise FieldError("messages", "no prompt messages before the assistant reply")
    last = messages[-1]
    if isinstance(last["content"], str) and not last["content"].strip() and not last.get("tool_calls"):
        raise FieldError("messages", "the assistant reply is empty")
    return Demonstration(messages[:first], _reply("messages", messages[first:]))


def _number(raw: dict[str, Any], field: str) -> float | None:
    value = raw.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FieldError(field, f"expected a number, got {type_name(value)}")
    if not math.isfinite(value):
        raise FieldError(field, f"expected a finite number, got {value}")
    return float(value)


def _label(raw: dict[str, Any]) -> bool:
    value = _required(raw, "label")
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    shown = value if isinstance(value, int | float) else type_name(value)
    raise FieldError("label", f"expected true/false or 1/0, got {shown}")
