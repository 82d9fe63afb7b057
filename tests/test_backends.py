"""Generation backends and `alignkit serve`, against real HTTP servers on loopback (nothing mocked)."""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from alignkit.data.tokenize import Encoder
from alignkit.judges.backends import BACKENDS, HTTPBackend, LocalBackend, chat_completions_url
from alignkit.models.tiny import tiny_model_and_tokenizer
from alignkit.serve import ChatHandler, ChatServer, make_server, prompt_limit, running, serving

CONVERSATIONS = [
    [{"role": "user", "content": "hello"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "x"}],
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_pair():
    return tiny_model_and_tokenizer(seed=0)


def fast_backend(url: str, **options) -> HTTPBackend:
    return HTTPBackend(url, **{"timeout_s": 10, "retries": 2, "backoff_s": 0.01, **options})


# ---------------------------------------------------------------- local backend


def test_local_greedy_is_deterministic_and_independent_of_batching(tiny_pair):
    batched = LocalBackend(*tiny_pair, batch_size=3).generate(CONVERSATIONS, max_tokens=10)
    again = LocalBackend(*tiny_pair, batch_size=3).generate(CONVERSATIONS, max_tokens=10)
    one_by_one = LocalBackend(*tiny_pair, batch_size=1).generate(CONVERSATIONS, max_tokens=10)
    assert [(g.text, g.tokens) for g in batched] == [(g.text, g.tokens) for g in again]
    assert [(g.text, g.tokens) for g in batched] == [(g.text, g.tokens) for g in one_by_one]
    assert all(g.error is None and g.finish_reason == "length" and len(g.tokens) == 10 for g in batched)


def test_local_top_logprobs_rank_the_greedy_choice_first(tiny_pair):
    (generation,) = LocalBackend(*tiny_pair).generate(CONVERSATIONS[:1], max_tokens=6, top_logprobs=4)
    assert len(generation.top_logprobs) == len(generation.tokens) == 6
    for token, step in zip(generation.tokens, generation.top_logprobs, strict=True):
        assert len(step) == 4 and token in step
        assert step[token] == max(step.values())
        assert all(value <= 0 for value in step.values())


def test_local_token_accounting_and_stop_at_eos(tiny_pair):
    model, tokenizer = tiny_model_and_tokenizer(seed=0)
    stop_id = tokenizer.convert_tokens_to_ids("<|user|>")   # what this untrained model says third
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop_id]
    backend = LocalBackend(model, tokenizer, batch_size=2)
    generations = backend.generate(CONVERSATIONS, max_tokens=12, top_logprobs=2)
    encoder = Encoder(tokenizer)
    assert [g.prompt_tokens for g in generations] == [len(encoder.encode(c).prompt) for c in CONVERSATIONS]
    stopped = generations[0]
    assert stopped.finish_reason == "stop" and "<|user|>" not in stopped.tokens
    assert stopped.completion_tokens == len(stopped.tokens) + 1 == len(stopped.top_logprobs) + 1
    assert backend.stats.calls == 2 and backend.stats.items == 3 and backend.stats.failures == 0
    assert backend.stats.prompt_tokens == sum(g.prompt_tokens for g in generations)
    assert backend.stats.completion_tokens == sum(g.completion_tokens for g in generations)


def test_local_seeded_sampling_is_reproducible_and_leaves_global_rng_alone(tiny_pair):
    backend = LocalBackend(*tiny_pair)
    state = torch.random.get_rng_state()
    first = backend.generate(CONVERSATIONS, max_tokens=12, temperature=1.0, seed=7)
    assert torch.equal(state, torch.random.get_rng_state())
    second = backend.generate(CONVERSATIONS, max_tokens=12, temperature=1.0, seed=7)
    other = backend.generate(CONVERSATIONS, max_tokens=12, temperature=1.0, seed=8)
    assert [g.tokens for g in first] == [g.tokens for g in second]
    assert [g.tokens for g in first] != [g.tokens for g in other]


def test_local_failure_is_returned_not_raised(tiny_pair, monkeypatch):
    model, tokenizer = tiny_pair
    backend = LocalBackend(model, tokenizer)

    def broken(**kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model, "generate", broken)
    mode = model.training
    generations = backend.generate(CONVERSATIONS, max_tokens=4)
    assert all(g.text == "" and "out of memory" in g.error for g in generations)
    assert backend.stats.failures == 3 and model.training == mode


def test_backends_registry():
    assert BACKENDS.names() == ["http", "local"]
    backend = BACKENDS.call("http", "http://127.0.0.1:9/v1/", max_concurrency=2)
    assert backend.url == "http://127.0.0.1:9/v1/chat/completions"
    assert chat_completions_url("https://api.example.com") == "https://api.example.com/v1/chat/completions"


# ---------------------------------------------------------------- the real alignkit server


@pytest.fixture
def server(tiny_pair):
    chat_server = make_server(*tiny_pair)
    with running(chat_server) as base_url:
        assert base_url == chat_server.base_url
        yield chat_server


def test_http_matches_local_greedy_with_logprobs_and_usage(tiny_pair, server):
    local = LocalBackend(*tiny_pair, batch_size=1).generate(CONVERSATIONS, max_tokens=8, top_logprobs=3)
    client = fast_backend(server.base_url)
    remote = client.generate(CONVERSATIONS, max_tokens=8, top_logprobs=3)
    for mine, theirs in zip(local, remote, strict=True):
        assert theirs.error is None
        assert (theirs.text, theirs.tokens, theirs.finish_reason) == (mine.text, mine.tokens, mine.finish_reason)
        assert (theirs.prompt_tokens, theirs.completion_tokens) == (mine.prompt_tokens, mine.completion_tokens)
        for step_mine, step_theirs in zip(mine.top_logprobs, theirs.top_logprobs, strict=True):
            assert step_mine.keys() == step_theirs.keys()
            assert all(abs(step_mine[t] - step_theirs[t]) < 1e-4 for t in step_mine)
    assert client.stats.calls == client.stats.items == 3 == server.counters.requests
    assert client.stats.prompt_tokens == sum(g.prompt_tokens for g in local)
    assert client.stats.completion_tokens == sum(g.completion_tokens for g in local)


def test_cache_hits_send_no_request(server):
    client = fast_backend(server.base_url)
    first = client.generate(CONVERSATIONS + CONVERSATIONS[:1], max_tokens=4)   # a duplicate is asked once
    assert server.counters.requests == 3
    second = client.generate(CONVERSATIONS, max_tokens=4)
    assert server.counters.requests == 3 and client.cache_hits == 4 and client.stats.calls == 3
    assert [g.text for g in second] == [g.text for g in first[:3]]
    client.generate(CONVERSATIONS[:1], max_tokens=4, temperature=1.0)            # sampled, no seed: not cached
    client.generate(CONVERSATIONS[:1], max_tokens=4, temperature=1.0)
    assert server.counters.requests == 5
    seeded = [client.generate(CONVERSATIONS[:1], max_tokens=4, temperature=1.0, seed=3)[0] for _ in range(2)]
    assert server.counters.requests == 6 and seeded[0].text == seeded[1].text


def test_concurrency_limit_is_respected(server):
    client = fast_backend(server.base_url, max_concurrency=3, cache=False)
    generations = client.generate(CONVERSATIONS * 4, max_tokens=16)
    assert all(g.error is None for g in generations)
    assert server.counters.requests == 12
    assert 2 <= server.counters.peak_in_flight <= 3


def test_serving_health_and_models(tiny_pair):
    with serving(*tiny_pair, model_name="judge") as base_url:
        assert read_json(base_url.removesuffix("/v1") + "/health")["status"] == "ok"
        assert read_json(f"{base_url}/models")["data"][0]["id"] == "judge"
        (answer,) = fast_backend(base_url, model="judge").generate(CONVERSATIONS[:1], max_tokens=3)
    assert answer.error is None and answer.completion_tokens == 3


class ClosingHandler(ChatHandler):
    """Closes its connection after each answer once the server has died (as a dead process would)."""

    def handle_one_request(self):
        super().handle_one_request()
        if self.server.dead:
            self.close_connection = True


def test_server_that_dies_mid_run_keeps_earlier_answers(tiny_pair):
    class DyingServer(ChatServer):
        dead = False

        def finish_request(self, request, client_address):
            ClosingHandler(request, client_address, self)

        def complete(self, request):
            generation = super().complete(request)
            if self.counters.requests == 2:   # answer this one, but stop listening first
                self.dead = True
                self.shutdown()
                self.server_close()
            return generation

    dying = DyingServer(("127.0.0.1", 0), LocalBackend(*tiny_pair, batch_size=1, tokenize=prompt_limit(512)), "m")
    thread = threading.Thread(target=dying.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    client = fast_backend(dying.base_url, max_concurrency=1, timeout_s=5)
    started = time.perf_counter()
    generations = client.generate([[{"role": "user", "content": f"question {i}"}] for i in range(5)], max_tokens=4)
    assert time.perf_counter() - started < 20
    assert [g.error is None for g in generations] == [True, True, False, False, False]
    assert all("connection error" in g.error for g in generations[2:])
    assert client.stats.failures == 3 and client.stats.calls == 2 + 3 * 3
    thread.join(timeout=5)


class CountingServer(ChatServer):
    """A chat server that counts the TCP connections it accepts."""

    connections = 0

    def process_request(self, request, client_address):
        self.connections += 1   # only the serve_forever thread calls this
        super().process_request(request, client_address)


def test_requests_reuse_pooled_connections(tiny_pair):
    server = CountingServer(("127.0.0.1", 0), LocalBackend(*tiny_pair, batch_size=1, tokenize=prompt_limit(512)), "m")
    with running(server) as base_url, fast_backend(base_url, max_concurrency=2, cache=False) as client:
        for _ in range(2):   # the second batch reuses the first one's connections
            generations = client.generate(CONVERSATIONS * 2, max_tokens=2)
            assert all(g.error is None for g in generations)
    assert server.counters.requests == client.stats.calls == 12
    assert 1 <= server.connections <= 2
    assert client.closed


def test_closed_backend_refuses_to_send():
    with fast_backend("http://127.0.0.1:9") as client:
        assert not client.closed
    assert client.closed
    with pytest.raises(RuntimeError, match="closed"):
        client.generate(CONVERSATIONS[:1])
    client.close()   # closing twice is harmless


def test_server_down_is_a_clear_connection_error():
    with socket.socket() as probe:   # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with fast_backend(f"http://127.0.0.1:{port}", retries=2) as client:
        (generation,) = client.generate(CONVERSATIONS[:1])
    assert generation.error.startswith("connection error: ConnectError: ")
    assert "refused" in generation.error and generation.error.endswith("(after 3 attempts)")
    assert not generation.timed_out and generation.text == ""
    assert client.stats.failures == 1 and client.stats.timeouts == 0 and client.stats.calls == 3


def test_cli_serves_the_tiny_model_as_a_real_process(tiny_pair):
    process = subprocess.Popen([sys.executable, "-m", "alignkit.cli", "serve", "tiny", "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = first_line(process, timeout_s=120)
        base_url = line.split(" at ")[1].split()[0]
        assert read_json(base_url.removesuffix("/v1") + "/health")["model"] == "tiny"
        (answer,) = fast_backend(base_url, model="tiny").generate(CONVERSATIONS[1:2], max_tokens=6)
        (expected,) = LocalBackend(*tiny_pair).generate(CONVERSATIONS[1:2], max_tokens=6)
        assert answer.error is None and answer.text == expected.text
        assert answer.completion_tokens == expected.completion_tokens == 6
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0, process.stderr.read()


# ---------------------------------------------------------------- faults, from scripted servers


class ScriptedServer(ThreadingHTTPServer):
    """Answers request i (0-based) with script(i, body) -> (status, raw body bytes, delay in seconds)."""

    daemon_threads = True

    def __init__(self, script):
        super().__init__(("127.0.0.1", 0), ScriptedHandler)
        self.script, self.bodies, self.lock = script, [], threading.Lock()
        self.connections = 0

    def process_request(self, request, client_address):
        self.connections += 1   # only the serve_forever thread calls this
        super().process_request(request, client_address)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ScriptedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            index = len(self.server.bodies)
            self.server.bodies.append(body)
        status, payload, delay = self.server.script(index, body)
        time.sleep(delay)
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except OSError:
            pass  # the client gave up (timeout test)

    def log_message(self, *args):
        pass


def ok(text: str, delay: float = 0.0):
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 5, "completion_tokens": 2}}
    return 200, json.dumps(answer).encode(), delay


def status(code: int, message: str = "nope"):
    return code, json.dumps({"error": {"message": message, "type": "test"}}).encode(), 0.0


@contextmanager
def scripted(script):
    server = ScriptedServer(script)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_timeouts_are_retried_then_reported():
    with scripted(lambda i, body: ok("late", delay=5.0)) as server:
        client = fast_backend(server.base_url, timeout_s=0.3, retries=1)
        started = time.perf_counter()
        (generation,) = client.generate(CONVERSATIONS[:1])
        assert time.perf_counter() - started < 4.0
    assert generation.timed_out and "timed out" in generation.error and generation.text == ""
    assert client.stats.timeouts == client.stats.failures == 1
    assert client.stats.calls == len(server.bodies) == 2


def test_a_timeout_then_an_answer_succeeds():
    with scripted(lambda i, body: ok("fine", delay=2.0 if i == 0 else 0.0)) as server:
        client = fast_backend(server.base_url, timeout_s=0.3)
        (generation,) = client.generate(CONVERSATIONS[:1])
    assert generation.text == "fine" and not generation.timed_out
    assert client.stats.timeouts == client.stats.failures == 0 and client.stats.calls == 2


def test_a_timed_out_connection_is_dropped_and_the_others_reused():
    with scripted(lambda i, body: ok(f"answer {i}", delay=2.0 if i == 0 else 0.0)) as server:
        with fast_backend(server.base_url, timeout_s=0.3, max_concurrency=1, cache=False) as client:
            answers = [client.generate(CONVERSATIONS[:1])[0].text for _ in range(4)]
    assert answers == ["answer 1", "answer 2", "answer 3", "answer 4"]   # the late answer 0 is never read
    assert server.connections == 2 and client.stats.calls == 5


def test_loopback_ignores_proxy_settings(monkeypatch):
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with scripted(lambda i, body: ok("direct")) as server, fast_backend(server.base_url) as client:
        (generation,) = client.generate(CONVERSATIONS[:1])
    assert generation.text == "direct" and len(server.bodies) == 1


def test_503_then_success():
    with scripted(lambda i, body: status(503) if i == 0 else ok("second time")) as server:
        client = fast_backend(server.base_url)
        (generation,) = client.generate(CONVERSATIONS[:1])
    assert generation.text == "second time" and generation.error is None
    assert (generation.prompt_tokens, generation.completion_tokens) == (5, 2)
    assert client.stats.calls == 2 and client.stats.failures == 0 and client.stats.prompt_tokens == 5


def test_persistent_500_fails_one_item_and_keeps_the_rest():
    def script(i, body):
        content = body["messages"][-1]["content"]
        return status(500, "boom") if content == "bad" else ok(content.upper())

    batch = [[{"role": "user", "content": c}] for c in ("one", "bad", "three")]
    with scripted(script) as server:
        client = fast_backend(server.base_url, retries=2)
        generations = client.generate(batch)
    assert [g.text for g in generations] == ["ONE", "", "THREE"]
    assert "HTTP 500" in generations[1].error and "boom" in generations[1].error
    assert client.stats.failures == 1 and client.stats.timeouts == 0
    assert client.stats.calls == len(server.bodies) == 2 + 3


@pytest.mark.parametrize("bad_answer, message", [
    (b"{not json", "malformed JSON"),
    (json.dumps({"choices": []}).encode(), "unexpected answer"),
])
def test_malformed_answers_are_retried(bad_answer, message):
    with scripted(lambda i, body: (200, bad_answer, 0.0) if i < 3 else ok("good")) as server:
        client = fast_backend(server.base_url, retries=2)
        (failed,) = client.generate(CONVERSATIONS[:1])
        (recovered,) = client.generate(CONVERSATIONS[:1])
    assert message in failed.error and client.stats.failures == 1
    assert recovered.text == "good" and client.stats.calls == 4


def test_400_is_not_retried_and_the_request_is_standard():
    with scripted(lambda i, body: status(400, "unknown model")) as server:
        client = fast_backend(server.base_url + "/v1", model="judge", api_key="sk-test", extra_body={"top_p": 0.5})
        (generation,) = client.generate(CONVERSATIONS[:1], max_tokens=7, temperature=0.5, top_logprobs=2, seed=1)
    assert "HTTP 400" in generation.error and "unknown model" in generation.error
    assert len(server.bodies) == client.stats.calls == 1
    assert server.bodies[0] == {"model": "judge", "messages": CONVERSATIONS[0], "max_tokens": 7, "temperature": 0.5,
                                "top_p": 0.5, "seed": 1, "logprobs": True, "top_logprobs": 2}
    assert client.cache == {}   # failures are not cached


# ---------------------------------------------------------------- helpers


def read_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def first_line(process: subprocess.Popen, timeout_s: float) -> str:
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(process.stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=timeout_s)
    except queue.Empty:
        pytest.fail(f"alignkit serve printed nothing in {timeout_s} s")
    assert line, f"alignkit serve exited: {process.stderr.read()}"
    return line
