"""Reward functions that hang, crash or run out of memory cost one deadline per batch and never the run:
in-process calls share one deadline; isolation=process runs them in worker processes that are killed."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from alignkit.isolation import WorkerPool
from alignkit.rewards import RuleReward
from alignkit.rewards.rules import BatchRuleReward
from alignkit.sources import build_source

REWARDS = '''
import ctypes, os, pathlib

def misbehaving(prompt, completion, reference):
    pathlib.Path(prompt).write_text(str(os.getpid()))      # the test reads which process ran the call
    if completion == "exit":
        os._exit(3)
    if completion == "segfault":
        ctypes.string_at(0)
    if completion == "loop":
        while True:
            pass
    if completion == "bomb":
        hog = []
        while True:
            hog.append(bytearray(64 << 20))
    return float(len(completion))

def length(prompt, completion, reference):
    return float(len(completion)) + (reference == "bonus")

def trl_length(completions, **kwargs):
    return [float(len(c)) for c in completions]

def trl_exit(completions, **kwargs):
    os._exit(4)
'''


@pytest.fixture
def rewards(tmp_path):
    path = tmp_path / "rewards.py"
    path.write_text(REWARDS)
    return path


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped (whoever adopted it may reap late)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def _pids(source) -> list[int]:
    return [worker.process.pid for worker in source.runner.workers]


def test_hanging_samples_in_process_share_one_deadline_instead_of_one_each():
    release = threading.Event()

    def hangs(prompt, completion, reference):
        release.wait(30)
        return 1.0

    source = RuleReward(hangs, timeout_s=0.5)
    started = time.monotonic()
    try:
        scores = source.score(["p"] * 8, ["c"] * 8)
        elapsed = time.monotonic() - started
    finally:
        release.set()
    assert elapsed < 8 * 0.5 / 2                 # one timeout per sample, one after another, took 4 s
    assert scores.failed.all() and source.stats.timeouts == 8
    assert "interrupted in its thread" in source.stats.examples[0]
    assert "not started" in source.stats.examples[-1]


def test_a_call_looping_in_python_is_stopped_at_the_deadline_in_process():
    laps = []

    def loops(prompt, completion, reference):
        while True:
            laps.append(1)
            if len(laps) > 10**9:
                return 0.0

    source = RuleReward(loops, timeout_s=0.3, workers=2)
    scores = source.score(["p"] * 2, ["c"] * 2)
    assert scores.failed.all() and source.stats.timeouts == 2
    deadline = time.monotonic() + 5
    while any(t.name == "alignkit-reward" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "alignkit-reward" for t in threading.enumerate()), "no thread runs user code on"
    count = len(laps)
    time.sleep(0.2)
    assert len(laps) == count


def test_crashes_and_hangs_in_worker_processes_are_failed_scores_and_the_workers_are_replaced(rewards, tmp_path):
    source = build_source(f"rule:{rewards}:misbehaving,isolation=process,workers=2,timeout_s=2,memory_mb=400")
    kinds = ["ok", "exit", "segfault", "bomb", "loop", "fine"]
    calls = [str(tmp_path / kind) for kind in kinds]
    try:
        scores = source.score(calls, kinds)
        assert scores.values.tolist() == [2.0, 0.0, 0.0, 0.0, 0.0, 4.0]
        assert scores.failed.tolist() == [False, True, True, True, True, False]
        assert source.stats.failures == 4 and source.stats.timeouts == 1
        assert source.stats.examples == ["sample 1: the worker process exited with code 3",
                                         "sample 2: the worker process died of SIGSEGV",
                                         "sample 3: MemoryError",
                                         "sample 4: timed out after 2s (its worker process was killed)"]
        crashed = [int((tmp_path / kind).read_text()) for kind in ("exit", "segfault", "loop")]
        assert not any(_running(pid) for pid in crashed)
        assert source.score(calls[:1], ["again"]).values.tolist() == [5.0]    # replaced workers score
    finally:
        source.close()


def test_looping_samples_in_worker_processes_share_one_deadline_and_leave_no_process(rewards, tmp_path):
    source = RuleReward(f"{rewards}:misbehaving", isolation="process", workers=2, timeout_s=1)
    calls = [str(tmp_path / f"call{i}") for i in range(6)]
    try:
        source.score([str(tmp_path / "warm")], ["warm"])     # starts the workers: the deadline times scoring alone
        started = time.monotonic()
        scores = source.score(calls, ["loop"] * 6)
        elapsed = time.monotonic() - started
        looping = {int((tmp_path / f"call{i}").read_text()) for i in range(6) if (tmp_path / f"call{i}").exists()}
    finally:
        source.close()
    assert elapsed < 6 * 1 / 2                      # one deadline, not one per sample
    assert scores.failed.all() and source.stats.timeouts == 6
    assert len(looping) == 2 and not any(_running(pid) for pid in looping)


def test_a_normal_function_scores_the_same_in_both_modes(rewards):
    prompts, completions, references = ["p"] * 5, ["a", "bb", "", "dddd", "e"], [None, "bonus", None, "x", "bonus"]
    expected = [1.0, 3.0, 0.0, 4.0, 2.0]
    for isolation in ("none", "process"):
        source = build_source(f"rule:{rewards}:length,isolation={isolation},workers=2")
        trl = build_source(f"rule:{rewards}:trl_length,isolation={isolation},workers=2")
        try:
            assert source.score(prompts, completions, references).values.tolist() == expected
            assert trl.score(prompts, completions).values.tolist() == [1.0, 2.0, 0.0, 4.0, 1.0]
            assert source.stats.failures == trl.stats.failures == 0
        finally:
            source.close()
            trl.close()


def test_a_trl_batch_function_that_kills_its_worker_fails_its_batch(rewards):
    source = build_source(f"rule:{rewards}:trl_exit,isolation=process,workers=2")
    try:
        assert isinstance(source, BatchRuleReward)
        scores = source.score(["p"] * 3, ["a", "b", "c"])
        assert scores.failed.all() and source.stats.failures == 3
        assert source.stats.examples == ["a batch of 3: the worker process exited with code 4"]
    finally:
        source.close()


def test_worker_processes_stop_with_the_source_at_exit_and_when_the_trainer_is_killed(rewards, tmp_path):
    source = RuleReward(f"{rewards}:length", isolation="process", workers=2)
    source.score(["p"], ["a"])
    pids = _pids(source)
    source.close()
    assert len(pids) == 2 and not any(_running(pid) for pid in pids)

    script = textwrap.dedent(f"""
        import sys
        from alignkit.isolation import WorkerPool, load_rule
        pool = WorkerPool(load_rule({f"{rewards}:misbehaving"!r}), workers=2)
        pool.run([(({str(tmp_path / "warm")!r}, "a", None), {{}})], 5)
        print(*[w.process.pid for w in pool.workers], flush=True)
        if sys.argv[1] == "loop":
            pool.run([(({str(tmp_path / "loop")!r}, "loop", None), {{}})], 60)
    """)
    exits = subprocess.run([sys.executable, "-c", script, "exit"], capture_output=True, text=True, timeout=60)
    pids = [int(pid) for pid in exits.stdout.split()]
    assert exits.returncode == 0 and len(pids) == 2 and not any(_running(pid) for pid in pids)

    killed = subprocess.Popen([sys.executable, "-c", script, "loop"], stdout=subprocess.PIPE, text=True)
    pids = [int(pid) for pid in killed.stdout.readline().split()]
    while not (tmp_path / "loop").exists():
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_running(pid) for pid in pids)


def test_isolation_options_are_checked(rewards):
    with pytest.raises(KeyError, match="unknown reward isolation 'thread'; known: none, process"):
        RuleReward(f"{rewards}:length", isolation="thread")
    with pytest.raises(ValueError, match="memory_mb .* needs isolation=process"):
        RuleReward(f"{rewards}:length", memory_mb=512)
    with pytest.raises(ValueError, match="memory_mb must be a positive"):
        RuleReward(f"{rewards}:length", isolation="process", memory_mb=0)
    with pytest.raises(ValueError, match="workers must be"):
        RuleReward(f"{rewards}:length", workers=0)
    with pytest.raises(ValueError, match="timeout_s must be"):
        RuleReward(f"{rewards}:length", timeout_s=0)
    with pytest.raises(ValueError, match="not a function at the top level of a file"):
        RuleReward(lambda prompt, completion, reference: 1.0, isolation="process")
    starved = WorkerPool(RuleReward(f"{rewards}:length").fn, workers=1, memory_mb=1)
    with pytest.raises(RuntimeError, match="a reward worker .*could not load length"):
        starved.run([(("p", "a", None), {})], 1)
    starved.close()
