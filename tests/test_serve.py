"""`alignkit serve` as OpenAI clients and real load meet it: real servers on loopback, real sockets, nothing mocked."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from alignkit.judges.backends import HTTPBackend
from alignkit.models.tiny import tiny_model_and_tokenizer
from alignkit.serve import make_server, running

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tiny_pair():
    return tiny_model_and_tokenizer(seed=0)


@pytest.fixture
def server(tiny_pair):
    chat_server = make_server(*tiny_pair)
    with running(chat_server):
        yield chat_server


def chat(url: str, **fields) -> httpx.Response:
    return httpx.post(f"{url}/chat/completions", json={"messages": HI, **fields}, timeout=30)


def completions(url: str, **fields) -> httpx.Response:
    return httpx.post(f"{url}/completions", json=fields, timeout=30)


def answer(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def texts(payload: dict) -> list[str]:
    return [c["message"]["content"] if "message" in c else c["text"] for c in payload["choices"]]


def wait_for(condition, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the server never got there"
        time.sleep(0.01)


def health(url: str, **options) -> dict:
    return httpx.get(url.removesuffix("/v1") + "/health", timeout=10, **options).json()


def sse(response: httpx.Response) -> list:
    """The events of a server-sent-event answer: JSON chunks, then the string "[DONE]"."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/event-stream"
    blocks = response.text.split("\n\n")
    assert blocks[-1] == "" and all(b.startswith("data: ") for b in blocks[:-1])
    payloads = [b.removeprefix("data: ") for b in blocks[:-1]]
    return [json.loads(p) for p in payloads[:-1]] + [payloads[-1]]


# ---------------------------------------------------------------- what OpenAI clients send


def test_stream_answers_in_server_sent_events(server):
    url = server.base_url
    whole = answer(chat(url, max_tokens=12, temperature=0))
    events = sse(chat(url, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert streamed == whole["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]

    text_events = sse(completions(url, prompt="abc", max_tokens=5, temperature=0, stream=True))
    assert text_events[-1] == "[DONE]" and all(c["object"] == "text_completion" for c in text_events[:-1])
    assert "".join(c["choices"][0]["text"] for c in text_events[:-1]) == \
        texts(answer(completions(url, prompt="abc", max_tokens=5, temperature=0)))[0]


def test_n_choices_are_distinct_seeded_and_counted_once(server):
    first = answer(chat(server.base_url, n=3, max_tokens=16, temperature=1.0, seed=11))
    again = answer(chat(server.base_url, n=3, max_tokens=16, temperature=1.0, seed=11))
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert texts(first) == texts(again) and len(set(texts(first))) == 3
    single = answer(chat(server.base_url, max_tokens=16, temperature=1.0, seed=11))
    assert texts(single) == texts(first)[:1]                   # choice i draws from the seed and i alone
    assert first["usage"]["prompt_tokens"] == single["usage"]["prompt_tokens"]   # one prompt, however many choices
    assert single["usage"]["completion_tokens"] < first["usage"]["completion_tokens"] <= 3 * 16


def test_stop_strings_end_the_text_before_them(server):
    (greedy,) = texts(answer(chat(server.base_url, max_tokens=24, temperature=0)))
    stop = greedy[6:8]
    cut = answer(chat(server.base_url, max_tokens=24, temperature=0, stop=["never there", stop]))
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert texts(cut) == [greedy[:greedy.find(stop)]]
    assert cut["usage"]["completion_tokens"] < 24


def test_top_p_keeps_the_nucleus(server):
    (greedy,) = texts(answer(chat(server.base_url, max_tokens=24, temperature=0)))
    nucleus_of_one = [texts(answer(chat(server.base_url, max_tokens=24, temperature=1.5, top_p=1e-6, seed=s)))[0]
                      for s in range(3)]
    assert nucleus_of_one == [greedy] * 3
    sampled = texts(answer(chat(server.base_url, max_tokens=24, temperature=1.5, seed=0)))
    assert sampled != [greedy]


def test_text_completions_take_texts_and_token_ids(server, tiny_pair):
    model, tokenizer = tiny_pair
    ids = tokenizer(tokenizer.bos_token + "hello", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    expected_text = tokenizer.decode(expected[0, len(ids):], skip_special_tokens=True)
    payload = answer(completions(server.base_url, prompt=["hello", ids, "x"], max_tokens=10, temperature=0))
    assert payload["object"] == "text_completion" and [c["index"] for c in payload["choices"]] == [0, 1, 2]
    assert texts(payload)[:2] == [expected_text, expected_text]
    assert payload["usage"]["prompt_tokens"] == 2 * len(ids) + 2
    default = answer(completions(server.base_url, prompt="hello", temperature=0))
    assert default["usage"]["completion_tokens"] == 16   # the OpenAI default max_tokens of this endpoint


def test_special_tokens_stay_out_of_the_text(server, tiny_pair):
    special = tiny_pair[1].all_special_tokens
    payload = answer(completions(server.base_url, prompt="a", n=4, max_tokens=64, temperature=1.0, seed=0, logprobs=1))
    generated = [t for c in payload["choices"] for t in c["logprobs"]["tokens"]]
    assert any(t in special for t in generated)                # this untrained model does say them
    events = sse(chat(server.base_url, n=4, max_tokens=64, temperature=1.0, seed=0, stream=True))
    streamed = [c["choices"][0]["delta"].get("content", "") for c in events[:-1]]
    assert not [t for t in texts(payload) + streamed for s in special if s in t]


def test_chat_logprobs_rank_the_chosen_token(server):
    payload = answer(chat(server.base_url, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3))
    steps = payload["choices"][0]["logprobs"]["content"]
    assert len(steps) == payload["usage"]["completion_tokens"] == 6
    for step in steps:
        assert len(step["top_logprobs"]) == 3 and step["top_logprobs"][0]["token"] == step["token"]
        assert step["logprob"] == step["top_logprobs"][0]["logprob"] <= 0


# ---------------------------------------------------------------- batching


def test_concurrent_requests_are_batched_and_seeds_still_hold(server):
    fields = [dict(messages=[{"role": "user", "content": f"question {i}" * (i + 1)}], max_tokens=48, temperature=1.0,
                   seed=i) for i in range(8)]
    start = threading.Barrier(len(fields))

    def ask(body):
        start.wait()
        return texts(answer(httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=60)))

    with ThreadPoolExecutor(len(fields)) as pool:
        together = list(pool.map(ask, fields))
    stats = server.worker.stats
    assert stats.batches < len(fields) and stats.largest_batch > 1 and stats.rows == len(fields)
    alone = [texts(answer(httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=60)))
             for body in fields]
    assert together == alone


# ---------------------------------------------------------------- limits before the model


def test_oversized_prompts_are_refused_without_waiting_for_the_model(server):
    url = server.base_url
    long_answer = []
    busy = threading.Thread(target=lambda: long_answer.append(chat(url, max_tokens=1024, temperature=0)))
    busy.start()
    wait_for(lambda: health(url)["generating"] == 1)
    huge = httpx.post(f"{url}/chat/completions", content=json.dumps({"messages": [
        {"role": "user", "content": "x" * 8_000_000}]}), timeout=30)
    long_text = chat(url, messages=[{"role": "user", "content": "x" * 70_000}])
    long_tokens = chat(url, messages=[{"role": "user", "content": "x" * 3000}])
    still_busy = busy.is_alive()
    busy.join()
    assert still_busy, "the long request ended first: nothing was shown"
    assert huge.status_code == 413
    assert long_text.status_code == long_tokens.status_code == 400
    assert "longer than this server's limit of 2048 tokens" in long_tokens.json()["error"]["message"]
    assert long_answer[0].status_code == 200


def test_a_full_queue_answers_503_with_retry_after(tiny_pair):
    server = make_server(*tiny_pair, max_batch_size=1, queue_size=1)
    with running(server) as url:
        with ThreadPoolExecutor(2) as pool:
            running_one = pool.submit(chat, url, max_tokens=1024, temperature=0)
            wait_for(lambda: health(url)["generating"] == 1)
            waiting_one = pool.submit(chat, url, max_tokens=2, temperature=0)
            wait_for(lambda: health(url)["queued"] == 1)
            refused = chat(url, max_tokens=2)
            assert running_one.running(), "the long request ended first: nothing was shown"
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
            assert refused.json()["error"]["type"] == "server_busy"
            assert running_one.result().status_code == waiting_one.result().status_code == 200


def test_idle_and_half_open_connections_are_closed(tiny_pair):
    server = make_server(*tiny_pair, timeout_s=0.3)
    with running(server) as url:
        host, port = server.server_address[:2]
        with socket.create_connection((host, port), timeout=10) as idle:
            assert idle.recv(1024) == b""                     # closed by the server, not by our 10 s
        with socket.create_connection((host, port), timeout=10) as half_open:
            half_open.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mess")
            reply = read_until_closed(half_open)
        assert reply.startswith(b"HTTP/1.1 408 ")
        assert answer(chat(url, max_tokens=2))["choices"]    # still serving


def test_api_key_is_required_on_every_request(tiny_pair):
    with running(make_server(*tiny_pair, api_key="sk-local")) as url:
        assert httpx.get(f"{url}/models", timeout=10).status_code == 401
        assert health(url) == {"error": {"message": "a valid API key is required", "type": "authentication_error",
                                         "param": None, "code": None}}
        wrong = chat(url, max_tokens=2)
        assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
        assert httpx.post(f"{url}/chat/completions", json={"messages": HI, "max_tokens": 2},
                          headers={"Authorization": "Bearer sk-other"}, timeout=10).status_code == 401
        with HTTPBackend(url, api_key="sk-local", retries=0) as client:
            (generation,) = client.generate([HI], max_tokens=2)
        assert generation.error is None and generation.completion_tokens == 2


BAD_BODIES = [   # (body, status): every one a client's mistake, so a 4xx
    (json.dumps({"messages": HI, "seed": 2**80}), 400),
    ("[" * 100_000 + "]" * 100_000, 400),
    ("{not json", 400),
    ("[1, 2]", 400),
    (json.dumps({"messages": "hi"}), 400),
    (json.dumps({"messages": [{"role": "user", "content": 3}]}), 400),
    (json.dumps({"messages": HI, "max_tokens": 5000}), 400),
    (json.dumps({"messages": HI, "max_tokens": True}), 400),
    (json.dumps({"messages": HI, "temperature": 10**400}), 400),
    ('{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400),
    (json.dumps({"messages": HI, "top_p": 0}), 400),
    (json.dumps({"messages": HI, "n": 0}), 400),
    (json.dumps({"messages": HI, "n": 65}), 400),
    (json.dumps({"messages": HI, "stop": ["a", "b", "c", "d", "e"]}), 400),
    (json.dumps({"messages": HI, "stream": "yes"}), 400),
    (json.dumps({"messages": HI, "logprobs": True, "top_logprobs": 21}), 400),
    (json.dumps({"messages": HI, "presence_penalty": 0.5}), 400),
    (json.dumps({"messages": [{"role": "user", "content": "x" * 3000}]}), 400),
    (json.dumps({"messages": [{"role": "r" * 100_000, "content": "hi"}]}), 400),
    ("x" * 2_000_000, 413),
]


@pytest.mark.parametrize("body, status", BAD_BODIES, ids=lambda v: v[:40] if isinstance(v, str) else str(v))
def test_bad_chat_requests_get_a_4xx_and_a_message(server, body, status):
    response = httpx.post(f"{server.base_url}/chat/completions", content=body, timeout=30)
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"]


@pytest.mark.parametrize("fields", [{}, {"prompt": []}, {"prompt": [[1, 2], 3]}, {"prompt": [10**6]},
                                    {"prompt": "a", "echo": True}, {"prompt": "a", "logprobs": 21},
                                    {"prompt": "x" * 3000}])
def test_bad_text_completion_requests_get_a_400(server, fields):
    response = completions(server.base_url, **fields)
    assert response.status_code == 400 and response.json()["error"]["message"]


def test_protocol_mistakes_get_a_4xx(server):
    url = server.base_url
    no_length = httpx.Request("POST", f"{url}/chat/completions", content=iter([b"{}"]))   # chunked, no length
    assert httpx.Client().send(no_length).status_code == 411
    assert httpx.post(f"{url}/embeddings", json={}, timeout=10).status_code == 404
    assert httpx.put(f"{url}/chat/completions", json={}, timeout=10).status_code == 405
    with HTTPBackend(url, retries=2) as client:   # a 400 is final: sent once
        (refused,) = client.generate([HI], max_tokens=5000)
    assert "HTTP 400" in refused.error and "max_tokens" in refused.error and client.stats.calls == 1


# ---------------------------------------------------------------- load, on a real `alignkit serve` process


def test_load_of_mixed_requests_from_16_clients(tmp_path):
    """16 clients, 320 requests (a fifth malformed or oversized): every well-formed one answered, every
    bad one refused with a 4xx, and the server's memory flat after the first rounds."""
    process = subprocess.Popen([sys.executable, "-m", "alignkit.cli", "serve", "tiny", "--port", "0",
                                "--max-tokens-limit", "16"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "ALIGNKIT_API_KEY": "sk-load"})
    try:
        url = re.search(r"at (http://\S+/v1)", process.stdout.readline()).group(1)
        started = time.perf_counter()
        warm = run_clients(url, clients=16, each=4, seed=0)
        rss_before = resident_mib(process.pid)
        results = run_clients(url, clients=16, each=16, seed=1)
        rss_after = resident_mib(process.pid)
        print(f"RSS {rss_before:.1f} -> {rss_after:.1f} MiB; {time.perf_counter() - started:.1f} s of requests")
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0, process.stderr.read()
    for well_formed, status, detail in warm + results:
        assert (status == 200) if well_formed else (400 <= status < 500), detail
    assert sum(w for w, _, _ in results) >= 200
    assert rss_after - rss_before < 30, (rss_before, rss_after)


def run_clients(url: str, clients: int, each: int, seed: int) -> list[tuple[bool, int, str]]:
    def client(index: int) -> list[tuple[bool, int, str]]:
        rng = random.Random(seed * 1000 + index)
        with httpx.Client(headers={"Authorization": "Bearer sk-load"}, timeout=60) as session:
            return [send(session, url, rng) for _ in range(each)]

    with ThreadPoolExecutor(clients) as pool:
        return [outcome for outcomes in pool.map(client, range(clients)) for outcome in outcomes]


def send(session: httpx.Client, url: str, rng: random.Random) -> tuple[bool, int, str]:
    if rng.random() < 0.2:
        path, content, headers = rng.choice(MALFORMED)
        response = session.post(url + path, content=content, headers=headers)
        return False, response.status_code, response.text[:200]
    fields = {"max_tokens": rng.randint(1, 16), "temperature": rng.choice([0.0, 1.0]), "n": rng.choice([1, 1, 2]),
              "stream": rng.random() < 0.3, "seed": rng.randrange(2**32)}
    if rng.random() < 0.5:
        response = session.post(f"{url}/chat/completions", json={**fields, "messages": [
            {"role": "user", "content": "q" * rng.randint(1, 200)}]})
    else:
        response = session.post(f"{url}/completions", json={**fields, "prompt": "p" * rng.randint(1, 200)})
    well_answered = response.status_code == 200 and (response.text.endswith("data: [DONE]\n\n") if fields["stream"]
                                                     else len(response.json()["choices"]) == fields["n"])
    return True, response.status_code if well_answered else -1, response.text[:200]


MALFORMED = [   # (path, body, extra headers)
    ("/chat/completions", "[" * 100_000, {}),
    ("/chat/completions", json.dumps({"messages": HI, "seed": 2**80}), {}),
    ("/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x" * 100_000}]}), {}),
    ("/chat/completions", "y" * 3_000_000, {}),
    ("/chat/completions", json.dumps({"messages": HI}), {"Authorization": "Bearer wrong"}),
    ("/completions", json.dumps({"prompt": "a", "max_tokens": -1}), {}),
    ("/completions", "{", {}),
]


def resident_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return kib / 1024


def read_until_closed(connection: socket.socket) -> bytes:
    data = b""
    while chunk := connection.recv(4096):
        data += chunk
    return data
