"""The OpenAI API subset `alignkit serve` speaks: request bodies checked into `ApiRequest`s, and answers
(whole, or as server-sent events) written from `Generation`s.

Two endpoints share the sampling fields and differ in what a prompt is (chat messages; or texts and
token-id lists) and in how a choice is written. Unknown fields are ignored; fields whose meaning the
server does not implement are refused unless they carry their neutral value (`UNSUPPORTED`).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from alignkit.judges.backends import Generation
from alignkit.rollout.base import SamplingConfig

MAX_TOP_LOGPROBS = 20
MAX_CHOICES = 64                  # prompts x n in one request
MAX_STOPS, MAX_STOP_CHARS = 4, 256
SEEDS = (-2**63, 2**64)           # int64 or uint64, as other OpenAI-compatible servers take them

UNSUPPORTED = {   # field -> its neutral values; anything else is refused
    "echo": (None, False), "suffix": (None, ""), "best_of": (None, 1), "logit_bias": (None, {}),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "tools": (None, []),
    "response_format": (None, {"type": "text"}),
}


class BadRequest(ValueError):
    """An answer other than 200: status, OpenAI error type, and headers to send with it."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.headers = status, kind, headers or {}


@dataclass
class ApiRequest:
    endpoint: Endpoint
    prompts: list                 # chat: one message list; completions: texts or token-id lists
    sampling: SamplingConfig
    n: int
    seed: int | None
    top_logprobs: int | None      # None: no log-probs; else alternatives per token (0: the chosen token's only)
    stream: bool
    include_usage: bool           # stream_options.include_usage: a last chunk with the usage


def parse(endpoint: Endpoint, body: dict, max_tokens_limit: int) -> ApiRequest:
    for name, neutral in UNSUPPORTED.items():
        _check(body.get(name) in neutral, f"{name} is not supported by this server")
    prompts, n = endpoint.prompts(body), _n(body)
    _check(len(prompts) * n <= MAX_CHOICES, f"at most {MAX_CHOICES} choices (prompts x n) per request")
    temperature = _temperature(body)
    sampling = SamplingConfig(max_new_tokens=_max_tokens(body, endpoint.default_max_tokens, max_tokens_limit),
                              temperature=temperature, top_p=_top_p(body) if temperature > 0 else 1.0,
                              stop=_stop(body))
    stream, options = _flag(body, "stream"), body.get("stream_options") or {}
    _check(isinstance(options, dict), "stream_options must be an object")
    return ApiRequest(endpoint, prompts, sampling, n, _seed(body), endpoint.logprobs(body), stream,
                      stream and _flag(options, "include_usage"))


# ---------------------------------------------------------------- endpoints


class Chat:
    """POST /v1/chat/completions."""

    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"
    default_max_tokens = 256

    def prompts(self, body: dict) -> list:
        return [parse_messages(body.get("messages"))]

    def logprobs(self, body: dict) -> int | None:
        return _top_logprobs(body.get("top_logprobs")) if _flag(body, "logprobs") else None

    def choice(self, index: int, answer: Generation, k: int | None) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": answer.text},
                "finish_reason": answer.finish_reason, "logprobs": self._logprobs(answer, k)}

    def chunks(self, index: int, answer: Generation, k: int | None) -> list[dict]:
        return [{"index": index, "delta": {"role": "assistant", "content": answer.text},
                 "logprobs": self._logprobs(answer, k), "finish_reason": None},
                {"index": index, "delta": {}, "logprobs": None, "finish_reason": answer.finish_reason}]

    @staticmethod
    def _logprobs(answer: Generation, k: int | None) -> dict | None:
        if k is None or answer.top_logprobs is None:
            return None
        return {"content": [{**_token_entry(token, step[token]), "top_logprobs": [
            _token_entry(text, logprob) for text, logprob in _top(step, k)]}
            for token, step in zip(answer.tokens, answer.top_logprobs, strict=True)]}


class Text:
    """POST /v1/completions."""

    object, chunk_object, id_prefix = "text_completion", "text_completion", "cmpl-"
    default_max_tokens = 16

    def prompts(self, body: dict) -> list:
        prompt = body.get("prompt")
        if isinstance(prompt, str) or _token_ids(prompt):
            return [prompt]
        _check(isinstance(prompt, list) and prompt and all(isinstance(p, str) or _token_ids(p) for p in prompt),
               "prompt must be a string, a list of token ids, or a non-empty list of either")
        return list(prompt)

    def logprobs(self, body: dict) -> int | None:
        value = body.get("logprobs")
        return None if value is None or value is False else _top_logprobs(value, "logprobs")

    def choice(self, index: int, answer: Generation, k: int | None) -> dict:
        return {"index": index, "text": answer.text, "finish_reason": answer.finish_reason,
                "logprobs": self._logprobs(answer, k)}

    def chunks(self, index: int, answer: Generation, k: int | None) -> list[dict]:
        return [{**self.choice(index, answer, k), "finish_reason": None},
                {"index": index, "text": "", "logprobs": None, "finish_reason": answer.finish_reason}]

    @staticmethod
    def _logprobs(answer: Generation, k: int | None) -> dict | None:
        if k is None or answer.top_logprobs is None:
            return None
        offsets = [0]
        for token in answer.tokens[:-1]:
            offsets.append(offsets[-1] + len(token))
        return {"tokens": answer.tokens,
                "token_logprobs": [step[token] for token, step in zip(answer.tokens, answer.top_logprobs, strict=True)],
                "top_logprobs": [dict(_top(step, k)) for step in answer.top_logprobs] if k else None,
                "text_offset": offsets[:len(answer.tokens)]}


Endpoint = Chat | Text
ENDPOINTS: dict[str, Endpoint] = {"/v1/chat/completions": Chat(), "/chat/completions": Chat(),
                                  "/v1/completions": Text(), "/completions": Text()}


# ---------------------------------------------------------------- answers


def response(request: ApiRequest, answers: list[Generation], model_name: str) -> dict:
    endpoint = request.endpoint
    choices = [endpoint.choice(i, answer, request.top_logprobs) for i, answer in enumerate(answers)]
    return {**_head(endpoint.object, endpoint.id_prefix, model_name), "choices": choices,
            "usage": usage(answers, request.n)}


def events(request: ApiRequest, answers: list[Generation], model_name: str) -> bytes:
    """The answer as server-sent events: a content chunk and a finish chunk per choice, the usage when
    asked for (stream_options.include_usage), then `data: [DONE]`."""
    endpoint = request.endpoint
    head = _head(endpoint.chunk_object, endpoint.id_prefix, model_name)
    chunks = [{**head, "choices": [choice]} for i, answer in enumerate(answers)
              for choice in endpoint.chunks(i, answer, request.top_logprobs)]
    if request.include_usage:
        chunks.append({**head, "choices": [], "usage": usage(answers, request.n)})
    return b"".join(f"data: {json.dumps(chunk)}\n\n".encode() for chunk in chunks) + b"data: [DONE]\n\n"


def usage(answers: list[Generation], n: int) -> dict:
    """Prompt tokens once per prompt (not per choice), completion tokens of every choice."""
    prompt = sum(answer.prompt_tokens for answer in answers[::n])
    completion = sum(answer.completion_tokens for answer in answers)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def error_body(err: BadRequest) -> dict:
    return {"error": {"message": str(err), "type": err.kind, "param": None, "code": None}}


def _head(kind: str, id_prefix: str, model_name: str) -> dict:
    return {"id": f"{id_prefix}{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model_name}


def _top(step: dict[str, float], k: int) -> list[tuple[str, float]]:
    return sorted(step.items(), key=lambda item: -item[1])[:k]


def _token_entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


# ---------------------------------------------------------------- fields


def parse_messages(messages) -> list[dict]:
    _check(isinstance(messages, list) and messages, "messages must be a non-empty list")
    parsed = []
    for i, message in enumerate(messages):
        _check(isinstance(message, dict) and isinstance(message.get("role"), str),
               f"messages[{i}] must be an object with a string role")
        parsed.append({"role": message["role"], "content": _text(message.get("content"), i)})
    return parsed


def _text(content, i: int) -> str:
    """Message content as a string; a list of text parts is joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        _check(all(isinstance(p.get("text", ""), str) for p in content), f"messages[{i}]: text parts must be strings")
        return "".join(p.get("text", "") for p in content)
    raise BadRequest(f"messages[{i}].content must be a string or a list of text parts")


def _max_tokens(body: dict, default: int, limit: int) -> int:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    value = min(default, limit) if value is None else value
    _check(_is_int(value) and 1 <= value <= limit,
           f"max_tokens must be an integer from 1 to {limit} (this server's limit)")
    return value


def _temperature(body: dict) -> float:
    value = _number(body, "temperature", 1.0)
    _check(value is not None and 0 <= value <= 2, "temperature must be a number from 0 to 2")
    return value


def _top_p(body: dict) -> float:
    value = _number(body, "top_p", 1.0)
    _check(value is not None and 0 < value <= 1, "top_p must be a number above 0 and at most 1")
    return value


def _n(body: dict) -> int:
    value = body.get("n")
    value = 1 if value is None else value
    _check(_is_int(value) and 1 <= value <= MAX_CHOICES, f"n must be an integer from 1 to {MAX_CHOICES}")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    stops = [] if value is None else [value] if isinstance(value, str) else value
    _check(isinstance(stops, list) and len(stops) <= MAX_STOPS
           and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops),
           f"stop must be a string or a list of at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} "
           "characters")
    return tuple(stops)


def _seed(body: dict) -> int | None:
    value = body.get("seed")
    _check(value is None or (_is_int(value) and SEEDS[0] <= value < SEEDS[1]),
           "seed must be an integer from -2**63 to 2**64 - 1")
    return value


def _top_logprobs(value, name: str = "top_logprobs") -> int:
    value = 0 if value is None else value
    _check(_is_int(value) and 0 <= value <= MAX_TOP_LOGPROBS, f"{name} must be an integer from 0 to {MAX_TOP_LOGPROBS}")
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name)
    _check(value is None or isinstance(value, bool), f"{name} must be true or false")
    return bool(value)


def _number(body: dict, name: str, default: float) -> float | None:
    """The field as a float, its default when absent, None when it is not a number."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        return float(value)
    except OverflowError:   # an integer past float's range
        return None


def _token_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_int(t) for t in value)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise BadRequest(message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
