"""`alignkit serve MODEL --port N`: an OpenAI-compatible chat-completions server for any model alignkit loads.

Standard library only (http.server). Requests are answered by one `LocalBackend`, one at a time,
so a served model renders prompts and generates exactly as `LocalBackend` does in process.

    from alignkit.serve import serving
    with serving(model, tokenizer) as base_url:      # port 0: a free port
        HTTPBackend(base_url).generate([[{"role": "user", "content": "hi"}]])
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from alignkit.data.tokenize import TokenizeConfig
from alignkit.judges.backends import Generation, LocalBackend

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 2**20
MAX_TOP_LOGPROBS = 20


class BadRequest(ValueError):
    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


@dataclass
class ChatRequest:
    messages: list[dict]
    max_tokens: int
    temperature: float
    logprobs: bool      # return the chosen tokens' logprobs
    top_logprobs: int   # and this many alternatives per token
    seed: int | None


@dataclass
class Counters:
    """Chat requests received, in flight now, and the most ever in flight at once."""

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
    """Serves one model; generation is serialised by `generate_lock`."""

    daemon_threads = True

    def __init__(self, address, backend: LocalBackend, model_name: str, *, max_tokens_limit: int = 1024,
                 verbose: bool = False):
        self.backend, self.model_name = backend, model_name
        self.max_tokens_limit, self.verbose = max_tokens_limit, verbose
        self.generate_lock = threading.Lock()
        self.counters = Counters()
        self.created = int(time.time())
        super().__init__(address, ChatHandler)

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/v1"

    def complete(self, request: ChatRequest) -> Generation:
        with self.generate_lock:
            self._check_prompt_length(request.messages)
            top_logprobs = max(request.top_logprobs, 1) if request.logprobs else 0
            return self.backend.generate([request.messages], max_tokens=request.max_tokens,
                                         temperature=request.temperature, top_logprobs=top_logprobs,
                                         seed=request.seed)[0]

    def _check_prompt_length(self, messages: list[dict]) -> None:
        encoder = self.backend.encoder
        before = encoder.truncated
        try:
            encoder.encode(messages)
        except Exception as err:  # a template that rejects these messages
            raise BadRequest(f"could not render the messages: {type(err).__name__}: {err}") from None
        if encoder.truncated > before:
            raise BadRequest(f"the prompt is longer than this server's limit of {encoder.cfg.max_prompt_length} "
                             "tokens (alignkit serve --max-prompt-length)")


class ChatServerIPv6(ChatServer):
    address_family = socket.AF_INET6


class ChatHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "alignkit-serve"
    server: ChatServer

    def do_GET(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        if path == "/health":
            self._send(200, {"status": "ok", "model": self.server.model_name})
        elif path in ("/v1/models", "/models"):
            self._send(200, {"object": "list", "data": [self._model_card()]})
        else:
            self._error(BadRequest(f"no such endpoint: GET {self.path}", 404, "not_found_error"))

    def do_POST(self) -> None:
        if self.path.split("?")[0].rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            self._discard_body()
            return self._error(BadRequest(f"no such endpoint: POST {self.path}", 404, "not_found_error"))
        with self.server.counters.track():
            try:
                request = parse_chat_request(self._read_json(), self.server.max_tokens_limit)
                generation = self.server.complete(request)
            except BadRequest as err:
                return self._error(err)
            except Exception as err:
                traceback.print_exc(file=sys.stderr)
                return self._error(BadRequest(f"internal error: {type(err).__name__}: {err}", 500, "server_error"))
            if generation.error is not None:
                print(f"alignkit serve: {generation.error}", file=sys.stderr, flush=True)
                return self._error(BadRequest(generation.error, 500, "server_error"))
            self._send(200, completion_response(generation, request, self.server.model_name))

    def _model_card(self) -> dict:
        return {"id": self.server.model_name, "object": "model", "created": self.server.created,
                "owned_by": "alignkit"}

    def _read_json(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise BadRequest("a Content-Length header is required", 411)
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            raise BadRequest(f"request body over {MAX_BODY_BYTES} bytes", 413)
        try:
            body = json.loads(self.rfile.read(int(length)))
        except ValueError as err:
            raise BadRequest(f"the request body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    def _discard_body(self) -> None:
        length = self.headers.get("Content-Length", "")
        if length.isdigit() and int(length) <= MAX_BODY_BYTES:
            self.rfile.read(int(length))
        else:
            self.close_connection = True

    def _error(self, err: BadRequest) -> None:
        with self.server.counters.lock:
            self.server.counters.errors += 1
        self._send(err.status, {"error": {"message": str(err), "type": err.kind, "param": None, "code": None}})

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away; nothing to answer

    def log_message(self, format: str, *args) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def log_error(self, format: str, *args) -> None:
        sys.stderr.write(f"alignkit serve: {self.address_string()}: {format % args}\n")


def parse_chat_request(body: dict, max_tokens_limit: int) -> ChatRequest:
    """Validate a chat-completions body; unknown fields are ignored (see docs/serving.md)."""
    _check(not body.get("stream"), "streaming is not supported; send stream=false")
    _check(body.get("n", 1) in (1, None), "only n=1 is supported")
    seed = body.get("seed")
    _check(seed is None or _is_int(seed), "seed must be an integer")
    logprobs = bool(body.get("logprobs", False))
    return ChatRequest(parse_messages(body.get("messages")), _max_tokens(body, max_tokens_limit),
                       _temperature(body), logprobs, _top_logprobs(body) if logprobs else 0, seed)


def _max_tokens(body: dict, limit: int) -> int:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    value = min(256, limit) if value is None else value
    _check(_is_int(value) and 1 <= value <= limit,
           f"max_tokens must be an integer from 1 to {limit} (this server's limit)")
    return value


def _temperature(body: dict) -> float:
    value = body.get("temperature")
    value = 1.0 if value is None else value
    _check(isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 2,
           "temperature must be a number from 0 to 2")
    return float(value)


def _top_logprobs(body: dict) -> int:
    value = body.get("top_logprobs") or 0
    _check(_is_int(value) and 0 <= value <= MAX_TOP_LOGPROBS,
           f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}")
    return value


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
        return "".join(str(p.get("text", "")) for p in content)
    raise BadRequest(f"messages[{i}].content must be a string or a list of text parts")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise BadRequest(message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def completion_response(generation: Generation, request: ChatRequest, model_name: str) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": generation.text},
              "finish_reason": generation.finish_reason or "stop", "logprobs": None}
    if request.logprobs and generation.tokens is not None:
        choice["logprobs"] = {"content": _logprobs_content(generation, request.top_logprobs)}
    usage = {"prompt_tokens": generation.prompt_tokens, "completion_tokens": generation.completion_tokens,
             "total_tokens": generation.prompt_tokens + generation.completion_tokens}
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model_name, "choices": [choice], "usage": usage}


def _logprobs_content(generation: Generation, k: int) -> list[dict]:
    content = []
    for token, step in zip(generation.tokens, generation.top_logprobs or [], strict=False):
        ranked = sorted(step.items(), key=lambda item: -item[1])[:k]
        content.append({**_token_entry(token, step[token]),
                        "top_logprobs": [_token_entry(text, logprob) for text, logprob in ranked]})
    return content


def _token_entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


# ---------------------------------------------------------------- Python API


def make_server(model, tokenizer, host: str = "127.0.0.1", port: int = 0, model_name: str = "default", *,
                max_tokens_limit: int = 1024, tokenize: TokenizeConfig | None = None,
                verbose: bool = False) -> ChatServer:
    """A server bound to (host, port) and not yet serving; port 0 picks a free port."""
    backend = LocalBackend(model, tokenizer, batch_size=1, tokenize=tokenize or prompt_limit(2048))
    server_class = ChatServerIPv6 if ":" in host else ChatServer
    return server_class((host, port), backend, model_name, max_tokens_limit=max_tokens_limit, verbose=verbose)


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
                             tokenize=prompt_limit(args.max_prompt_length, args.template), verbose=args.verbose)
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
