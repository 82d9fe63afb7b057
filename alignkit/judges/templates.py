"""Judge prompt templates and the parsers that read a verdict or a score back out of free text.

A judge's answer ends with a tagged verdict, `<answer>A</answer>` (pairwise: A, B or tie) or
`<answer>7</answer>` (pointwise score), optionally after `<think>...</think>` reasoning, the
format Think-RM trains (Hong et al. 2025, arXiv 2505.16265). Parsers also accept the common
`[[A]]` and `Verdict: A` / `Score: 7` forms and read the last one in the text, so a judge that
restates the options while reasoning is still read by its final word.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from alignkit.data.records import VERDICTS, Prompt
from alignkit.registry import Registry

TEMPLATES = Registry("judge template")

PAIRWISE_PATTERNS = [
    r"<answer>\s*\[*\s*(A|B|tie)\s*\]*\s*</answer>",
    r"\[\[\s*(A|B|tie)\s*\]\]",
    r"(?:verdict|answer|better)\s*(?:is)?\s*[:=]?\s*\**\s*(?:answer\s+)?\[*(A|B|tie)\b",
]
SCORE_PATTERNS = [
    r"<answer>\s*(\d+(?:\.\d+)?)\s*</answer>",
    r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]",
    r"(?:score|rating)\s*[:=]\s*\**\s*(\d+(?:\.\d+)?)",
]


@dataclass(frozen=True)
class Match:
    """What was read, and where in the text (for the verdict token's log-probability)."""

    value: str
    start: int


def _last_match(patterns: list[str], text: str) -> Match | None:
    found = [m for pattern in patterns for m in re.finditer(pattern, text, flags=re.IGNORECASE)]
    if not found:
        return None
    last = max(found, key=lambda m: m.end())
    return Match(last.group(1), last.start(1))


def parse_verdict(text: str) -> Match | None:
    """The last verdict in `text`, canonicalised to A, B or tie; None when there is none."""
    match = _last_match(PAIRWISE_PATTERNS, text)
    if match is None:
        return None
    canonical = {v.lower(): v for v in VERDICTS}[match.value.lower()]
    return Match(canonical, match.start)


def parse_score(text: str, low: float, high: float) -> Match | None:
    """The last score in `text` if it lies in [low, high]; None otherwise."""
    match = _last_match(SCORE_PATTERNS, text)
    if match is None or not low <= float(match.value) <= high:
        return None
    return match


def render_prompt(prompt: Prompt) -> str:
    """A chat prompt as plain text for embedding in a judge's question."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def answer_text(verdict: str, reasoning: str = "") -> str:
    """The judge answer a template asks for: reasoning in <think> tags, then the verdict."""
    think = f"<think>{reasoning}</think>\n" if reasoning else ""
    return f"{think}<answer>{verdict}</answer>"


@dataclass(frozen=True)
class Template:
    """A judge prompt: an optional system message and a user message with named fields."""

    user: str
    system: str | None = None

    def messages(self, **fields: str) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": "user", "content": self.user.format(**fields)}]


TEMPLATES.register("pairwise", summary="which of answers A and B is better; <answer>A|B|tie</answer>", kind="pairwise")(
    Template(
        "Question:\n{question}\n\n[Answer A]\n{a}\n\n[Answer B]\n{b}\n\n"
        "Which answer is better? Think in <think></think>, then reply <answer>A</answer>, "
        "<answer>B</answer> or <answer>tie</answer>."
    )
)
TEMPLATES.register("pointwise", summary="rate one answer from low to high; <answer>N</answer>", kind="pointwise")(
    Template(
        "Question:\n{question}\n\n[Answer]\n{answer}\n\n"
        "Rate the answer from {low} (worst) to {high} (best). Think in <think></think>, then reply "
        "<answer>N</answer>."
    )
)

TEMPLATES.register("additive", summary="the self-rewarding rubric: one point per criterion met, 0-5; Score: N",
                   kind="pointwise", paper="Yuan et al. 2024, arXiv 2401.10020")(
    Template(
        "Judge the answer to the user's question below with an additive score from {low} to {high}.\n"
        "Add one point if the answer is on topic and gives some information that bears on the question.\n"
        "Add a second point if it deals with a large part of the question, even if not completely.\n"
        "Add a third point if it answers the essential question in a way a reader can use.\n"
        "Add a fourth point if it is written clearly and directly from an assistant's point of view.\n"
        "Add a fifth point if it is complete, accurate and to the point, with nothing superfluous.\n\n"
        "Question:\n{question}\n\n[Answer]\n{answer}\n\n"
        "Explain your reasoning briefly, then end with the line \"Score: N\" where N is the total."
    )
)


def pairwise_messages(template: str, prompt: Prompt, a: str, b: str) -> list[dict]:
    return _template(template, "pairwise").messages(question=render_prompt(prompt), a=a, b=b)


def pointwise_messages(template: str, prompt: Prompt, answer: str, low: int, high: int) -> list[dict]:
    return _template(template, "pointwise").messages(question=render_prompt(prompt), answer=answer,
                                                     low=str(low), high=str(high))


def _template(name: str, kind: str) -> Template:
    entry = TEMPLATES.get(name)
    if entry.meta.get("kind") != kind:
        raise ValueError(f"judge template {name!r} is {entry.meta.get('kind')}, not {kind}")
    return entry.fn


def verdict_match(prompt, completion: str, reference: str | None) -> float:
    """Think-RM stage 2 (arXiv 2505.16265): 1 when the last parsed verdict equals the gold verdict, else 0."""
    if reference is None:
        raise ValueError("verdict_match needs the gold verdict as the reference")
    match = parse_verdict(completion)
    return float(match is not None and match.value.lower() == reference.lower())
