"""Generation backends for judges: a local model, or any OpenAI-compatible chat-completions server.

Both take conversations (lists of {"role", "content"} messages) and return one `Generation` per
conversation. A failed request never raises out of `generate()`: its `Generation` carries the
error, the failure is counted in `stats`, and the rest of the batch keeps its answers.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import threading
import time
import urllib.parse
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import httpx
import torch

from alignkit.data.tokenize import Encoder, TokenizeConfig
from alignkit.registry import Registry
from alignkit.rewards.base import CallStats
from alignkit.rollout.tokens import eos_ids, left_pad

BACKENDS = Registry("generation backend")


@dataclass
class Generation:
    """One answer. `tokens` and `top_logprobs` cover the generated tokens, the stop token excluded."""

    text: str
    tokens: list[str] | None = None
    top_logprobs: list[dict[str, float]] | None = None  # per token: {text: logprob} of the top-k, chosen included
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None    # set when the request failed (after retries); text is then ""
    timed_out: bool = False
    finish_reason: str | None = None   # "stop" (end of sequence) or "length" (max_tokens reached)


class Backend(Protocol):
    stats: CallStats

    def generate(self, conversations: Sequence[list[dict]], *, max_tokens: int = 256, temperature: float = 0.0,
                 top_logprobs: int = 0, seed: int | None = None) -> list[Generation]: ...


def failed(message: str, timed_out: bool = False) -> Generation:
    return Generation(text="", error=message, timed_out=timed_out)


# ---------------------------------------------------------------- local model


@BACKENDS.register("local", summary="a model in this process, prompts rendered exactly as in training")
class LocalBackend:
    """Batched `model.generate` on prompts encoded by the training `Encoder`.

    Greedy when temperature is 0, otherwise plain sampling from softmax(logits / temperature) (no
    top-k or top-p, whatever the model's generation config says). A seed makes sampling reproducible
    for the same conversations and batch size; it does not touch the global torch RNG.
    `top_logprobs` are computed from the model's raw logits, before temperature.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 8, tokenize: TokenizeConfig | None = None):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.encoder = Encoder(tokenizer, tokenize)
        self.eos_ids = eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.stats = CallStats()

    def generate(self, conversations, *, max_tokens=256, temperature=0.0, top_logprobs=0, seed=None):
        results = []
        for start in range(0, len(conversations), self.batch_size):
            batch = list(conversations[start:start + self.batch_size])
            results += self._generate_batch(batch, max_tokens, temperature, top_logprobs, seed)
        return results

    def _generate_batch(self, batch, max_tokens, temperature, top_logprobs, seed) -> list[Generation]:
        with self.stats.timed(len(batch)):
            try:
                prompts = [self.encoder.encode(messages).prompt for messages in batch]
                new_ids, ranked = self._run_model(prompts, max_tokens, temperature, top_logprobs, seed)
            except Exception as err:  # a failed batch is reported, never raised
                message = f"local generation failed: {type(err).__name__}: {err}"
                for _ in batch:
                    self.stats.failure(message)
                return [failed(message) for _ in batch]
        generations = [self._decode(row, new_ids[row], ranked, len(p)) for row, p in enumerate(prompts)]
        self.stats.prompt_tokens += sum(g.prompt_tokens for g in generations)
        self.stats.completion_tokens += sum(g.completion_tokens for g in generations)
        return generations

    def _run_model(self, prompts, max_tokens, temperature, top_logprobs, seed):
        ids, attention = left_pad(prompts, self.pad_id, self.model.device)
        config = self._generation_config(max_tokens, temperature, top_logprobs > 0)
        training = self.model.training
        try:
            self.model.eval()  # no dropout while generating; the caller's mode is restored
            with torch.no_grad(), _seeded(seed, self.model.device):
                out = self.model.generate(input_ids=ids, attention_mask=attention, generation_config=config)
        finally:
            self.model.train(training)
        new_ids = out.sequences[:, ids.shape[1]:]
        ranked = rank_steps(out.logits, new_ids, top_logprobs) if top_logprobs > 0 else None
        return new_ids.tolist(), ranked

    def _generation_config(self, max_tokens, temperature, want_logits):
        from transformers import GenerationConfig

        options = dict(max_new_tokens=max_tokens, eos_token_id=self.eos_ids, pad_token_id=self.pad_id,
                       num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0,
                       return_dict_in_generate=True, output_logits=want_logits)
        if temperature > 0:  # neutral values, so the model's own sampling defaults do not apply
            options.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, min_p=0.0)
        else:
            options.update(do_sample=False)
        return GenerationConfig(**options)

    def _decode(self, row, new_ids, ranked, prompt_tokens) -> Generation:
        stop = next((i for i, t in enumerate(new_ids) if t in self.eos_ids), None)
        kept = new_ids if stop is None else new_ids[:stop]
        generation = Generation(
            text=self.tokenizer.decode(kept, skip_special_tokens=True),
            tokens=[self.tokenizer.decode([t]) for t in kept],
            prompt_tokens=prompt_tokens,
            completion_tokens=len(new_ids) if stop is None else stop + 1,
            finish_reason="length" if stop is None else "stop",
        )
        if ranked is not None:
            generation.top_logprobs = ranked_tokens(self.tokenizer, kept, *(t[row].tolist() for t in ranked))
        return generation


def ranked_tokens(tokenizer, kept, chosen_logprobs, top_values, top_ids) -> list[dict[str, float]]:
    """Per token of `kept`: {text: logprob} of the token itself, then of the top-k alternatives."""
    steps = []
    for token, logprob, values, ids in zip(kept, chosen_logprobs, top_values, top_ids, strict=False):
        entry = {tokenizer.decode([token]): logprob}
        for value, index in zip(values, ids, strict=True):
            entry.setdefault(tokenizer.decode([index]), value)
        steps.append(entry)
    return steps


def rank_steps(step_logits, new_ids, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row and step: the chosen token's logprob and the top-k (logprobs, ids); one step at a time in float32."""
    chosen, values, ids = [], [], []
    for step, logits in enumerate(step_logits):
        logprobs = torch.log_softmax(logits.float(), -1)
        chosen.append(logprobs.gather(1, new_ids[:, step:step + 1]).squeeze(1))
        top = logprobs.topk(min(k, logprobs.shape[-1]), -1)
        values.append(top.values)
        ids.append(top.indices)
    return torch.stack(chosen, 1).cpu(), torch.stack(values, 1).cpu(), torch.stack(ids, 1).cpu()


@contextmanager
def _seeded(seed: int | None, device) -> Iterator[None]:
    """Seed torch's RNG for a block and restore it afterwards; no-op without a seed."""
    if seed is None:
        yield
        return
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# ---------------------------------------------------------------- HTTP (OpenAI-compatible)


class _Retryable(Exception):
    def __init__(self, message: str, timed_out: bool = False, retry_after: float | None = None):
        super().__init__(message)
        self.timed_out, self.retry_after = timed_out, retry_after


class _Fatal(Exception):
    pass


LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@BACKENDS.register("http", summary="an OpenAI-compatible /v1/chat/completions server (httpx, pooled connections)")
class HTTPBackend:
    """Chat completions over HTTP with retries, a concurrency bound and an answer cache.

    Requests go through one `httpx.Client` per backend, whose pool keeps up to `max_concurrency`
    connections open between requests and batches (keep-alive). `close()` (or `with backend:`)
    closes them; a backend that is garbage-collected, or still open at interpreter exit, is closed then.

    Retried (up to `retries` more attempts, exponential backoff with jitter): connection errors,
    timeouts, HTTP 429 and 5xx, and answers that are not the expected JSON. Other non-2xx answers
    fail at once. `timeout_s` bounds each socket operation of an attempt (connect, each read, each
    write); waiting for a free pooled connection is not bounded and is not a timeout.

    Accounting: `stats.calls` counts HTTP requests sent (retries included), `stats.items` the
    conversations sent (once each, however many attempts), `stats.failures` / `stats.timeouts` the
    conversations that failed after all attempts (a timeout when the last attempt timed out),
    `stats.seconds` the summed duration of requests, and tokens come from each answer's `usage`.
    Cache hits send nothing and count nowhere but in `cache_hits`.
    """

    def __init__(self, base_url: str, model: str = "default", *, timeout_s: float = 30, retries: int = 3,
                 backoff_s: float = 0.5, max_concurrency: int = 8, cache: bool = True, api_key: str | None = None,
                 extra_body: dict | None = None):
        if max_concurrency < 1 or retries < 0:
            raise ValueError("max_concurrency must be at least 1 and retries at least 0")
        self.url = chat_completions_url(base_url)
        self.model, self.timeout_s, self.retries, self.backoff_s = model, timeout_s, retries, backoff_s
        self.max_concurrency, self.extra_body = max_concurrency, dict(extra_body or {})
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.cache: dict[str, Generation] | None = {} if cache else None
        self.cache_hits = 0
        self.stats = CallStats()
        self._lock = threading.Lock()
        self._client = self._make_client()
        self._finalizer = weakref.finalize(self, self._client.close)  # also runs at interpreter exit

    def _make_client(self) -> httpx.Client:
        limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
        timeout = httpx.Timeout(self.timeout_s, pool=None)
        loopback = urllib.parse.urlsplit(self.url).hostname in LOOPBACK
        return httpx.Client(limits=limits, timeout=timeout, trust_env=not loopback)  # no proxy for loopback

    @property
    def closed(self) -> bool:
        return self._client.is_closed

    def close(self) -> None:
        """Close the pooled connections; the backend cannot send requests afterwards."""
        self._finalizer()

    def __enter__(self) -> HTTPBackend:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def generate(self, conversations, *, max_tokens=256, temperature=0.0, top_logprobs=0, seed=None):
        if self.closed:
            raise RuntimeError("this HTTPBackend is closed")
        bodies = [self._body(m, max_tokens, temperature, top_logprobs, seed) for m in conversations]
        keys = [json.dumps(b, sort_keys=True, separators=(",", ":")) for b in bodies]
        cacheable = self.cache is not None and (temperature == 0 or seed is not None)
        answers: dict[int | str, Generation] = {}
        pending = {}  # one request per distinct body when caching, one per conversation otherwise
        for i, (body, key) in enumerate(zip(bodies, keys, strict=True)):
            if cacheable and key in self.cache:
                self.cache_hits += 1
                answers[key] = self.cache[key]
            elif cacheable and key in pending:
                self.cache_hits += 1   # the same request earlier in this batch answers it
            elif cacheable:
                pending[key] = body
            else:
                pending[i] = body
        if pending:
            with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
                answers.update(zip(pending, pool.map(self._request, pending.values()), strict=True))
        if cacheable:
            self.cache.update({key: answers[key] for key in pending if answers[key].error is None})
        return [_copy(answers[key] if cacheable else answers[i]) for i, key in enumerate(keys)]

    def _body(self, messages, max_tokens, temperature, top_logprobs, seed) -> dict:
        body = {"model": self.model, "messages": list(messages), "max_tokens": max_tokens,
                "temperature": temperature, **self.extra_body}
        if seed is not None:
            body["seed"] = seed
        if top_logprobs > 0:
            body.update(logprobs=True, top_logprobs=top_logprobs)
        return body

    def _request(self, body: dict) -> Generation:
        with self._lock:
            self.stats.items += 1
        data = json.dumps(body).encode()
        for attempt in itertools.count():
            try:
                generation = parse_chat_completion(self._post(data))
                self._count_tokens(generation)
                return generation
            except _Fatal as err:
                return self._fail(str(err), False)
            except _Retryable as err:
                if attempt == self.retries:
                    return self._fail(f"{err} (after {attempt + 1} attempts)", err.timed_out)
                time.sleep(self._delay(attempt, err.retry_after))

    def _post(self, data: bytes) -> dict:
        started = time.perf_counter()
        try:
            response = self._client.post(self.url, content=data, headers=self._headers())
        except httpx.RequestError as err:
            raise _transport_error(err) from None
        finally:
            with self._lock:
                self.stats.calls += 1
                self.stats.seconds += time.perf_counter() - started
        if not response.is_success:
            raise _http_error(response)
        raw = response.content
        try:
            return json.loads(raw)
        except ValueError:
            raise _Retryable(f"malformed JSON in the answer: {_snippet(raw)}") from None

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        delay = self.backoff_s * 2 ** attempt * random.uniform(0.5, 1.0)
        return max(delay, min(retry_after, 60.0)) if retry_after is not None else delay

    def _fail(self, message: str, timed_out: bool) -> Generation:
        with self._lock:
            self.stats.failure(message, timeout=timed_out)
        return failed(message, timed_out)

    def _count_tokens(self, generation: Generation) -> None:
        with self._lock:
            self.stats.prompt_tokens += generation.prompt_tokens
            self.stats.completion_tokens += generation.completion_tokens


def chat_completions_url(base_url: str) -> str:
    base = base_url.rstrip("/")
    base = base[: -len("/v1")] if base.endswith("/v1") else base
    return f"{base}/v1/chat/completions"


def parse_chat_completion(data: dict) -> Generation:
    """A Generation from an OpenAI chat-completion object; missing or mistyped fields are retryable."""
    try:
        choice = data["choices"][0]
        text = choice["message"]["content"] or ""
        if not isinstance(text, str):
            raise TypeError("message.content is not a string")
        usage = data.get("usage") or {}
        generation = Generation(text=text, prompt_tokens=int(usage.get("prompt_tokens", 0)),
                                completion_tokens=int(usage.get("completion_tokens", 0)),
                                finish_reason=choice.get("finish_reason"))
        content = (choice.get("logprobs") or {}).get("content")
        if content is not None:
            generation.tokens = [step["token"] for step in content]
            generation.top_logprobs = [_step_logprobs(step) for step in content]
        return generation
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
        raise _Retryable(f"unexpected answer ({type(err).__name__}: {err}): {_snippet(json.dumps(data))}") from None


def _step_logprobs(step: dict) -> dict[str, float]:
    entry = {step["token"]: float(step["logprob"])}
    for alternative in step.get("top_logprobs") or []:
        entry.setdefault(alternative["token"], float(alternative["logprob"]))
    return entry


def _http_error(response: httpx.Response) -> Exception:
    code = response.status_code
    message = f"HTTP {code}: {_snippet(response.content) or '(no body)'}"
    if code == 429 or code >= 500:
        return _Retryable(message, retry_after=_seconds(response.headers.get("Retry-After")))
    return _Fatal(message)


def _transport_error(err: httpx.RequestError) -> _Retryable:
    timed_out = isinstance(err, httpx.TimeoutException)
    kind = "timed out" if timed_out else "connection error"
    return _Retryable(f"{kind}: {type(err).__name__}: {str(err) or 'no details'}", timed_out=timed_out)


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _snippet(raw: bytes | str, limit: int = 200) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    return text if len(text) <= limit else text[:limit] + "..."


def _copy(generation: Generation) -> Generation:
    """A copy, so callers may edit their answers without touching the cache."""
    return Generation(generation.text, list(generation.tokens) if generation.tokens is not None else None,
                      [dict(s) for s in generation.top_logprobs] if generation.top_logprobs is not None else None,
                      generation.prompt_tokens, generation.completion_tokens, generation.error,
                      generation.timed_out, generation.finish_reason)
