"""`alignkit serve MODEL --port N`: an OpenAI-compatible chat and text completions server for any alignkit model.

Standard library HTTP (http.server, one thread per connection). A request thread checks the request
(body size, fields, prompt length: alignkit.serve_api) and tokenises it before anything waits on the
model; the job then goes to a bounded queue, and one generation thread (alignkit.serve_batch)
answers what is queued in batches through the rollout engine. A full queue answers 503 with
Retry-After; connections idle or stalled for `timeout_s` are closed; with an API key, every request
must carry it. docs/serving.md says what is guaranteed.

    from alignkit.serve import serving
    with serving(model, tokenizer) as base_url:      # port 0: a free port
        HTTPBackend(base_url).generate([[{"role": "user", "content": "hi"}]])
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from alignkit.data.tokenize import CHARS_PER_TOKEN, Encoder, TokenizeConfig
from alignkit.judges.backends import Generation, LocalBackend
from alignkit.rollout.base import prompt_seeds
from alignkit.serve_api import ENDPOINTS, ApiRequest, BadRequest, error_body, events, parse, response
from alignkit.serve_batch import GenerationFailed, GenerationWorker, Job, QueueFull, Stopped

log = logging.getLogger(__name__)

DISCARD_LIMIT = 64 * 2**20    # an oversized body up to this is read and dropped, so its client gets the 413
RETRY_AFTER_S = 1
FAILURES = {   # what a job that did not run answers
    QueueFull: (503, "server_busy"),
    Stopped: (503, "server_busy"),
    GenerationFailed: (500, "server_error"),
}


def body_limit(max_prompt_length: int) -> int:
    """The largest request body: 1 MiB, plus room for the longest prompt text the token limit could admit
    written with JSON's longest escapes (12 bytes a character)."""
    return 2**20 + 12 * CHARS_PER_TOKEN * max_prompt_length


@dataclass
class Counters:
    """Completion requests received, in flight now, and the most ever in flight at once."""

    requests: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    errors: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @contextmanager
    def track(self) -> Iterator[None]:
        with self.lock:
            self.requests += 1
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            yield
        finally:
            with self.lock:
                self.in_flight -= 1


class ChatServer(ThreadingHTTPServer):
    """Serves one model. Prompts are rendered as `backend` renders them (its template and prompt limit),
    and generated in batches of up to `backend.batch_size` rows by one `GenerationWorker`."""

    daemon_threads = True

    def __init__(self, address, backend: LocalBackend, model_name: str, *, max_tokens_limit: int = 1024,
                 queue_size: int = 64, timeout_s: float = 30.0, api_key: str | None = None, verbose: bool = False):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.backend, self.model_name, self.verbose = backend, model_name, verbose
        self.max_tokens_limit, self.timeout_s, self.api_key = max_tokens_limit, timeout_s, api_key
        cfg = backend.encoder.cfg
        self.max_prompt_length, self.max_body_bytes = cfg.max_prompt_length, body_limit(cfg.max_prompt_length)
        # one token over the limit is kept, so a prompt over it can be told from one at it
        self.encoders = {template: Encoder(backend.tokenizer, prompt_limit(cfg.max_prompt_length + 1, template))
                         for template in (cfg.template, "plain")}
        self.chat_template = cfg.template
        self.vocab_size = backend.model.get_input_embeddings().num_embeddings
        self.counters = Counters()
        self.created = int(time.time())
        self.worker = GenerationWorker(backend.model, backend.tokenizer, max_batch=backend.batch_size,
                                       queue_size=queue_size)
        try:
            super().__init__(address, ChatHandler)
        except BaseException:
            self.worker.stop()
            raise

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/v1"

    def job_for(self, request: ApiRequest) -> Job:
        """Tokenise and check the prompts (on the request's own thread); one row per choice."""
        prompts = [self._prompt_ids(prompt) for prompt in request.prompts]
        rows = [prompt for prompt in prompts for _ in range(request.n)]
        seed = request.seed if request.seed is not None else secrets.randbits(64)
        top_logprobs = 0 if request.top_logprobs is None else max(request.top_logprobs, 1)
        return Job(rows, prompt_seeds(seed, len(rows)), request.sampling, top_logprobs)

    def complete(self, job: Job) -> list[Generation]:
        """Queue the job and wait for its answers, one per row."""
        try:
            self.worker.submit(job)
        except (QueueFull, Stopped) as err:
            raise _failure(err) from None
        job.done.wait()
        if job.error is not None:
            raise _failure(job.error)
        return job.answers

    def _prompt_ids(self, prompt) -> list[int]:
        limit = self.max_prompt_length
        too_long = BadRequest(f"the prompt is longer than this server's limit of {limit} tokens "
                              "(alignkit serve --max-prompt-length)")
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):   # token ids
            if len(prompt) > limit:
                raise too_long
            if not all(0 <= t < self.vocab_size for t in prompt):
                raise BadRequest(f"token ids must be from 0 to {self.vocab_size - 1}")
            return prompt
        if _characters(prompt) > CHARS_PER_TOKEN * limit:   # more than the limit could hold: not tokenised
            raise too_long
        encoder = self.encoders["plain" if isinstance(prompt, str) else self.chat_template]
        try:
            ids = encoder.encode(prompt).prompt
        except Exception as err:  # a template that rejects these messages
            raise BadRequest(f"could not render the prompt: {type(err).__name__}: {err}") from None
        if len(ids) > limit:
            raise too_long
        if not ids:
            raise BadRequest("the prompt has no tokens")
        return ids

    def server_close(self) -> None:
        super().server_close()
        self.worker.stop()

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):   # a client that went away is no error of ours
            super().handle_error(request, client_address)


class ChatServerIPv6(ChatServer):
    address_family = socket.AF_INET6


class ChatHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "alignkit-serve"
    server: ChatServer

    def setup(self) -> None:
        self.timeout = self.server.timeout_s   # bounds every read and write on this connection
        super().setup()

    def do_GET(self) -> None:
        route = GET_ROUTES.get(_path(self.path))
        if not self._authorised():
            return self._error(BadRequest("a valid API key is required", 401, "authentication_error",
                                          {"WWW-Authenticate": "Bearer"}))
        if route is None:
            return self._error(BadRequest(f"no such endpoint: GET {self.path}", 404, "not_found_error"))
        self._send(200, route(self.server))

    def do_POST(self) -> None:
        endpoint = ENDPOINTS.get(_path(self.path))
        if not self._authorised():
            self._discard_body()
            return self._error(BadRequest("a valid API key is required", 401, "authentication_error",
                                          {"WWW-Authenticate": "Bearer"}))
        if endpoint is None:
            self._discard_body()
            return self._error(BadRequest(f"no such endpoint: POST {self.path}", 404, "not_found_error"))
        with self.server.counters.track():
            try:
                request = parse(endpoint, self._read_json(), self.server.max_tokens_limit)
                answers = self.server.complete(self.server.job_for(request))
            except BadRequest as err:
                return self._error(err)
            except Exception as err:
                traceback.print_exc(file=sys.stderr)
                return self._error(BadRequest(f"internal error: {type(err).__name__}: {err}", 500, "server_error"))
            if request.stream:
                self._send_bytes(200, events(request, answers, self.server.model_name), "text/event-stream")
            else:
                self._send(200, response(request, answers, self.server.model_name))

    def _not_allowed(self) -> None:
        self._discard_body()
        self._error(BadRequest(f"method {self.command} is not allowed", 405, "invalid_request_error",
                               {"Allow": "GET, POST"}))

    do_PUT = do_PATCH = do_DELETE = _not_allowed

    def _authorised(self) -> bool:
        key = self.server.api_key
        given = self.headers.get("Authorization", "")
        return key is None or hmac.compare_digest(given.encode(), f"Bearer {key}".encode())

    def _read_json(self) -> dict:
        size = self._content_length()
        if size is None:
            self.close_connection = True
            raise BadRequest("a Content-Length header is required", 411)
        if size > self.server.max_body_bytes:
            self._discard(size)
            raise BadRequest(f"request body over {self.server.max_body_bytes} bytes", 413)
        raw = self._read(size)
        try:
            body = json.loads(raw)
        except RecursionError:
            raise BadRequest("the request body is nested too deeply") from None
        except ValueError as err:
            raise BadRequest(f"the request body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    def _content_length(self) -> int | None:
        length = self.headers.get("Content-Length", "")
        return int(length) if length.isascii() and length.isdigit() else None

    def _read(self, size: int) -> bytes:
        try:
            raw = self.rfile.read(size)
        except TimeoutError:
            self.close_connection = True
            raise BadRequest(f"the request body did not arrive within {self.server.timeout_s} s", 408) from None
        if len(raw) < size:
            self.close_connection = True
            raise BadRequest("the request body is shorter than its Content-Length")
        return raw

    def _discard_body(self) -> None:
        size = self._content_length()
        if size is None:
            self.close_connection = self.close_connection or "Transfer-Encoding" in self.headers
        else:
            self._discard(size)

    def _discard(self, size: int) -> None:
        """Read and drop a body (up to DISCARD_LIMIT; past that the connection is closed instead)."""
        if size > DISCARD_LIMIT:
            self.close_connection = True
            return
        try:
            while size > 0 and (chunk := self.rfile.read(min(size, 2**16))):
                size -= len(chunk)
        except TimeoutError:
            pass
        self.close_connection = self.close_connection or size > 0

    def _error(self, err: BadRequest) -> None:
        with self.server.counters.lock:
            self.server.counters.errors += 1
        if err.status >= 500:
            print(f"alignkit serve: {err}", file=sys.stderr, flush=True)
        self._send(err.status, error_body(err), err.headers)

    def _send(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        self._send_bytes(status, json.dumps(payload).encode(), "application/json", headers)

    def _send_bytes(self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away; nothing to answer

    def log_message(self, format: str, *args) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def log_error(self, format: str, *args) -> None:
        if format.startswith("Request timed out") and not self.server.verbose:
            return   # an idle keep-alive connection being closed is routine
        sys.stderr.write(f"alignkit serve: {self.address_string()}: {format % args}\n")


GET_ROUTES = {
    "/health": lambda server: {"status": "ok", "model": server.model_name, "queued": len(server.worker.queue),
                               "generating": server.worker.stats.generating},
    "/v1/models": lambda server: {"object": "list", "data": [_model_card(server)]},
    "/models": lambda server: {"object": "list", "data": [_model_card(server)]},
}


def _model_card(server: ChatServer) -> dict:
    return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "alignkit"}


def _path(raw: str) -> str:
    return raw.split("?")[0].rstrip("/")


def _characters(prompt) -> int:
    return len(prompt) if isinstance(prompt, str) else sum(len(m["role"]) + len(m["content"]) for m in prompt)


def _failure(err: Exception) -> BadRequest:
    status, kind = FAILURES[type(err)]
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return BadRequest(f"{err}; retry later" if status == 503 else str(err), status, kind, headers)


# ---------------------------------------------------------------- Python API


def make_server(model, tokenizer, host: str = "127.0.0.1", port: int = 0, model_name: str = "default", *,
                max_tokens_limit: int = 1024, tokenize: TokenizeConfig | None = None, max_batch_size: int = 16,
                queue_size: int = 64, timeout_s: float = 30.0, api_key: str | None = None,
                verbose: bool = False) -> ChatServer:
    """A server bound to (host, port) and not yet serving; port 0 picks a free port."""
    backend = LocalBackend(model, tokenizer, batch_size=max_batch_size, tokenize=tokenize or prompt_limit(2048))
    server_class = ChatServerIPv6 if ":" in host else ChatServer
    return server_class((host, port), backend, model_name, max_tokens_limit=max_tokens_limit, queue_size=queue_size,
                        timeout_s=timeout_s, api_key=api_key, verbose=verbose)


def prompt_limit(max_prompt_length: int, template: str = "auto") -> TokenizeConfig:
    return TokenizeConfig(max_length=max_prompt_length + 1, max_prompt_length=max_prompt_length, template=template)


@contextmanager
def running(server: ChatServer) -> Iterator[str]:
    """Serve `server` from a background thread; yields its base URL and shuts it down on exit."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.base_url
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextmanager
def serving(model, tokenizer, port: int = 0, **options) -> Iterator[str]:
    """`make_server` plus `running`: `with serving(model, tokenizer) as base_url: ...`."""
    with running(make_server(model, tokenizer, port=port, **options)) as base_url:
        yield base_url


# ---------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    parser.add_argument("model", help='"tiny", a local directory, or a hub id')
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (the URL is printed)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--model-name", help="the model id clients see (default: MODEL)")
    parser.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask for")
    parser.add_argument("--max-prompt-length", type=int, default=2048, help="longer prompts are refused (400)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="most choices generated in one batch")
    parser.add_argument("--queue-size", type=int, default=64, help="requests that may wait; more get 503")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds a connection may sit idle or stall in a read or write before it is closed")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request "
                        "(default: $ALIGNKIT_API_KEY, which, unlike this option, other users cannot read in ps)")
    parser.add_argument("--template", default="auto", choices=["auto", "chat", "plain"],
                        help="prompt rendering, as in training (data.tokenize.template)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1... (auto: cuda when available)")
    parser.add_argument("--gguf-file", help="a GGUF file inside MODEL's directory to load (dequantised)")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")


def run(args) -> int:
    import torch

    from alignkit.models.loading import ModelConfig, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(
        ModelConfig(name=args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                    gguf_file=args.gguf_file))
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = model.to(device).eval()
    try:
        server = make_server(model, tokenizer, args.host, args.port, args.model_name or args.model,
                             max_tokens_limit=args.max_tokens_limit,
                             tokenize=prompt_limit(args.max_prompt_length, args.template),
                             max_batch_size=args.max_batch_size, queue_size=args.queue_size, timeout_s=args.timeout,
                             api_key=args.api_key or os.environ.get("ALIGNKIT_API_KEY") or None, verbose=args.verbose)
    except ValueError as err:
        print(f"alignkit serve: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"alignkit serve: cannot listen on {args.host}:{args.port}: {err}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)  # a plain kill shuts down cleanly too
    log.info("alignkit serve: %s at %s (Ctrl-C to stop)", server.model_name, server.base_url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
