"""Typed training records, and the parsers that build them from raw rows (one per record kind)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from alignkit.registry import Registry

Message = dict[str, str]
Prompt = str | list[Message]


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
    prompt: Prompt
    completion: str
    index: int = 0
    origin: str = ""


@dataclass(frozen=True)
class Comparison:
    prompt: Prompt
    chosen: str
    rejected: str
    margin: float | None = None
    subset: str | None = None
    index: int = 0
    origin: str = ""


@dataclass(frozen=True)
class Rating:
    prompt: Prompt
    completion: str
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
    summary="a prompt and a completion to imitate (prompt/completion, or a chat `messages` list)",
    record_type=Demonstration,
)
def parse_demonstration(raw: dict[str, Any]) -> Demonstration:
    if raw.get("prompt") is None and raw.get("messages") is not None:
        return _demonstration_from_messages(raw["messages"])
    return Demonstration(_prompt(raw), _text(raw, "completion"))


@RECORD_KINDS.register(
    "comparison",
    summary="a prompt with a chosen and a rejected completion (optional margin or scores, subset)",
    record_type=Comparison,
)
def parse_comparison(raw: dict[str, Any]) -> Comparison:
    prompt, chosen, rejected = _prompt(raw), _text(raw, "chosen"), _text(raw, "rejected")
    if chosen.strip() == rejected.strip():
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
    return Rating(_prompt(raw), _text(raw, "completion"), _label(raw))


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
    """A non-empty list of {"role": str, "content": str}; other keys are dropped."""
    if not isinstance(value, list) or not value:
        raise FieldError(field, f"expected a non-empty list of chat messages, got {_describe(value)}")
    for position, message in enumerate(value):
        if not isinstance(message, dict):
            raise FieldError(field, f"message {position}: expected an object, got {type_name(message)}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                got = type_name(message.get(key))
                raise FieldError(field, f"message {position}: expected a string {key!r}, got {got}")
    return [{"role": message["role"], "content": message["content"]} for message in value]


def _describe(value: Any) -> str:
    return "an empty list" if value == [] else type_name(value)


def _demonstration_from_messages(value: Any) -> Demonstration:
    messages = _messages("messages", value)
    *prompt, reply = messages
    if reply["role"] != "assistant":
        raise FieldError("messages", f"the last message must have role 'assistant', got {reply['role']!r}")
    if not prompt:
        raise FieldError("messages", "no prompt messages before the assistant reply")
    if not reply["content"].strip():
        raise FieldError("messages", "the assistant reply is empty")
    return Demonstration(prompt, reply["content"])


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
