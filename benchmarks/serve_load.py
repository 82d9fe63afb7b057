"""Requests/s and latency of `alignkit serve` under concurrent clients.

Starts `alignkit serve MODEL` as its own process on a free port, warms it up with one request per
client, then `--clients` threads each send `--requests` chat completions (`--max-tokens` tokens at
most, temperature 1, a seed per request) over kept-alive connections. Reports requests/s,
completion tokens/s and p50 / p99 latency, and fails if any request failed.

`--max-batch-size 1` serves one request at a time. `--at REV` serves with `alignkit/serve.py` as it
was at commit REV instead (read with `git show`; the rest of alignkit as it is now), to compare with
the server before batching.

    python benchmarks/serve_load.py [--model tiny] [--clients 16] [--requests 8] [--max-tokens 256]
                                    [--max-batch-size 16] [--threads 1] [--at REV]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

LAUNCH_OLD = ("import argparse, sys; sys.path.insert(0, sys.argv.pop(1)); import serve_at_rev as serve; "
              "parser = argparse.ArgumentParser(); serve.add_arguments(parser); "
              "sys.exit(serve.run(parser.parse_args(sys.argv[1:])))")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_command(args, port: int, folder: str) -> list[str]:
    common = [args.model, "--port", str(port), "--max-tokens-limit", str(max(args.max_tokens, 1024))]
    if args.at is None:
        return [sys.executable, "-m", "alignkit.cli", "serve", *common, "--max-batch-size", str(args.max_batch_size)]
    source = subprocess.run(["git", "show", f"{args.at}:alignkit/serve.py"], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).resolve().parent).stdout
    Path(folder, "serve_at_rev.py").write_text(source)
    return [sys.executable, "-c", LAUNCH_OLD, folder, *common]


def wait_until_up(url: str, process: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited: {process.stderr.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit("the server did not come up")


def client_run(url: str, client: int, requests: int, max_tokens: int) -> list[tuple[float, int, int]]:
    """(seconds, status, completion tokens) of each request of one client."""
    results = []
    with httpx.Client(timeout=600) as session:
        for i in range(requests):
            body = {"messages": [{"role": "user", "content": f"client {client}, question {i}: what comes next?"}],
                    "max_tokens": max_tokens, "temperature": 1.0, "seed": client * 1000 + i}
            started = time.perf_counter()
            response = session.post(f"{url}/v1/chat/completions", json=body)
            seconds = time.perf_counter() - started
            tokens = response.json()["usage"]["completion_tokens"] if response.status_code == 200 else 0
            results.append((seconds, response.status_code, tokens))
    return results


def load(url: str, clients: int, requests: int, max_tokens: int) -> tuple[float, list[tuple[float, int, int]]]:
    with ThreadPoolExecutor(clients) as pool:
        started = time.perf_counter()
        runs = list(pool.map(lambda c: client_run(url, c, requests, max_tokens), range(clients)))
        return time.perf_counter() - started, [result for run in runs for result in run]


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=8, help="per client")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument("--at", help="serve with alignkit/serve.py of this commit")
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as folder:
        process = subprocess.Popen(server_command(args, port, folder), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        try:
            wait_until_up(url, process)
            load(url, args.clients, 1, args.max_tokens)
            seconds, results = load(url, args.clients, args.requests, args.max_tokens)
        finally:
            process.terminate()
            process.wait(timeout=60)
    latencies = [s for s, _, _ in results]
    failed = sum(status != 200 for _, status, _ in results)
    report = {"server": f"serve.py at {args.at}" if args.at else f"max_batch_size {args.max_batch_size}",
              "clients": args.clients, "requests": len(results), "failed": failed,
              "requests_per_s": round(len(results) / seconds, 2),
              "completion_tokens_per_s": round(sum(t for _, _, t in results) / seconds, 1),
              "p50_s": round(statistics.median(latencies), 3), "p99_s": round(percentile(latencies, 99), 3)}
    print(json.dumps(report))
    if failed:
        raise SystemExit(f"{failed} requests failed")


if __name__ == "__main__":
    main()
