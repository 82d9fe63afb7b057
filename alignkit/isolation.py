"""Call a user's function (a reward rule) on a batch of inputs with one deadline for the whole batch.

Two ways to run the calls (`ISOLATION`):
- "none": threads of the calling process. A call still running at the deadline is interrupted the
  only way Python allows: an exception raised in its thread, which takes effect at its next Python
  bytecode. A call blocked inside C (a sleep, a socket read, a long regex match) keeps running until
  that returns; a crash in it kills the process.
- "process": a small pool of worker processes, started once and reused. A worker still running at
  the deadline is killed with whatever it started, and so is one that crashed; each is replaced.

Workers are fresh interpreters (`python -c`, never a fork of a process that may hold torch threads)
that import only this module and the user's file: this module imports nothing heavy, so a worker
starts in tens of milliseconds even when the training script imported torch.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import pickle
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import suppress
from multiprocessing import connection
from pathlib import Path
from typing import Any, NamedTuple

from alignkit.registry import Registry

ISOLATION = Registry("reward isolation")
Call = tuple[tuple, dict]    # positional and keyword arguments of one call
STARTUP_S = 120.0            # the most a worker may take to import the user's file
_LOADED_PREFIX = "alignkit_rule_"
_BOOT = "from alignkit.isolation import serve; serve()"


class Outcome(NamedTuple):
    value: Any = None
    error: str | None = None     # "ValueError: ...", "timed out after 2s ...", "the worker died ..."
    timed_out: bool = False


def load_rule(spec: str) -> Callable:
    """Load `path/to/file.py:function` (as given on the command line)."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise ValueError(f"reward function {spec!r} must look like path/to/file.py:function_name")
    if not Path(path).is_file():
        raise FileNotFoundError(f"reward function file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(f"{_LOADED_PREFIX}{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        raise ValueError(f"could not import {path}: {type(err).__name__}: {err}") from err
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"{path} has no function {name!r}")
    return fn


def call(fn: Callable, args: tuple, kwargs: dict) -> Outcome:
    try:
        return Outcome(fn(*args, **kwargs))
    except BaseException as err:  # noqa: BLE001 - SystemExit too: reported as this call's failure
        return Outcome(error=f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)


def _timed_out(timeout_s: float, where: str) -> Outcome:
    return Outcome(error=f"timed out after {timeout_s:g}s ({where})", timed_out=True)


class DeadlinePassed(BaseException):
    """Raised inside a reward thread whose batch is past its deadline (a BaseException: `except Exception`
    in user code does not swallow it)."""


def _interrupt(thread_id: int) -> None:
    """Raise DeadlinePassed in another thread at its next bytecode (CPython's PyThreadState_SetAsyncExc)."""
    import ctypes  # here, not at the top: worker processes import this module and stay lean

    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(DeadlinePassed))


class _ThreadBatch:
    """One batch shared by a few threads, each taking the next call until none is left or time is up."""

    def __init__(self, fn: Callable, calls: Sequence[Call]):
        self.fn, self.calls = fn, calls
        self.todo = iter(range(len(calls)))
        self.running: dict[int, int] = {}   # call index -> thread id, while the call runs
        self.started: set[int] = set()
        self.outcomes: dict[int, Outcome] = {}
        self.lock, self.done, self.open = threading.Lock(), threading.Event(), True

    def work(self) -> None:
        with suppress(DeadlinePassed):   # delivered late, between two calls: the thread just ends
            while True:
                with self.lock:
                    index = next(self.todo, None) if self.open else None
                    if index is None:
                        return
                    self.started.add(index)
                    self.running[index] = threading.get_ident()
                outcome = call(self.fn, *self.calls[index])
                with self.lock:
                    del self.running[index]
                    self.outcomes[index] = outcome
                    if len(self.outcomes) == len(self.calls):
                        self.done.set()

    def close(self, timeout_s: float) -> list[Outcome]:
        """The outcomes at the deadline; calls still running are interrupted (see the module docstring)."""
        with self.lock:
            self.open = False
            for thread_id in self.running.values():
                _interrupt(thread_id)
            still_running = _timed_out(timeout_s, "interrupted in its thread; code blocked in C runs on until it "
                                                  "returns, isolation=process kills it")
            waiting = _timed_out(timeout_s, "not started: every worker was busy")
            return [self.outcomes.get(i, still_running if i in self.started else waiting)
                    for i in range(len(self.calls))]


@ISOLATION.register("none", summary="threads of the training process: a crash kills it, a hang is interrupted")
class InProcess:
    def __init__(self, fn: Callable, *, workers: int = 4, memory_mb: int | None = None):
        if memory_mb is not None:
            raise ValueError("memory_mb limits worker processes: it needs isolation=process")
        self.fn, self.workers = fn, workers

    def run(self, calls: Sequence[Call], timeout_s: float) -> list[Outcome]:
        if not calls:
            return []
        batch = _ThreadBatch(self.fn, calls)
        for _ in range(min(self.workers, len(calls))):
            threading.Thread(target=batch.work, daemon=True, name="alignkit-reward").start()
        batch.done.wait(timeout_s)
        return batch.close(timeout_s)

    def close(self) -> None:
        pass


def reference(fn: Callable) -> tuple:
    """How a worker finds `fn`: ("pickle", bytes) for what is importable by name, else ("file", path, name)
    for a function at the top level of a file (a rule file, a script)."""
    module = getattr(fn, "__module__", None) or ""
    if module != "__main__" and not module.startswith(_LOADED_PREFIX):
        with suppress(Exception):
            return "pickle", pickle.dumps(fn)
    path = getattr(inspect.unwrap(fn), "__globals__", {}).get("__file__")
    name = getattr(fn, "__qualname__", "")
    if not path or not name.isidentifier():
        raise ValueError(f"isolation=process loads the reward function by name in worker processes: {fn!r} "
                         "is not a function at the top level of a file (give file.py:name)")
    return "file", path, name


def _resolve(target: tuple) -> Callable:
    kind, *where = target
    return pickle.loads(where[0]) if kind == "pickle" else load_rule(f"{where[0]}:{where[1]}")


def _exit_with_parent() -> None:
    """A worker outlives no training process, even one killed outright, even while user code hangs."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def serve() -> None:
    """A worker: load the function, say so (None, or why not), then answer calls until the socket closes."""
    conn = connection.Connection(int(sys.argv[1]))
    path, target, memory_mb = conn.recv()
    sys.path[:] = path
    _exit_with_parent()
    if memory_mb:
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    try:
        fn, load_error = _resolve(target), None
    except BaseException as err:  # noqa: BLE001 - sent to the training process, which raises it
        fn, load_error = None, f"{type(err).__name__}: {err}"
    conn.send(load_error)
    while True:
        try:
            args, kwargs = conn.recv()
        except EOFError:
            return
        outcome = call(fn, args, kwargs) if fn else Outcome(error=f"could not load the function: {load_error}")
        try:
            conn.send(outcome)
        except Exception as err:  # noqa: BLE001 - e.g. a return value that cannot be pickled
            conn.send(Outcome(error=f"returned {type(outcome.value).__name__}, not sendable: {err}"))


def _death(code: int | None) -> str:
    if code is not None and code < 0:
        return f"the worker process died of {signal.Signals(-code).name}"
    return f"the worker process exited with code {code}"


class _Worker:
    """One worker process (its own session, so a kill takes what it started too) and its socket."""

    def __init__(self, target: tuple, memory_mb: int | None):
        ours, theirs = socket.socketpair()
        self.process = subprocess.Popen([sys.executable, "-c", _BOOT, str(theirs.fileno())],
                                        pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        theirs.close()
        self.conn = connection.Connection(ours.detach())
        self.conn.send((sys.path, target, memory_mb))
        self.ready, self.index = False, None    # index: the call it is running

    def stop(self) -> int:
        if self.process.returncode is None:          # not yet reaped, so its group id is still its own
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        code = self.process.wait()
        self.conn.close()
        return code

    def await_ready(self, name: str) -> None:
        if not self.conn.poll(STARTUP_S):
            self.stop()
            raise RuntimeError(f"a reward worker could not load {name} within {STARTUP_S:g}s")
        try:
            load_error = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"a reward worker could not load {name}: {_death(self.stop())}") from None
        if load_error:
            self.stop()
            raise RuntimeError(f"a reward worker could not load {name}: {load_error}")
        self.ready = True


def _stop_all(workers: list[_Worker], owner: int) -> None:
    if os.getpid() != owner:          # a fork of the training process exiting leaves its workers alone
        return
    for worker in workers:
        worker.stop()
    workers.clear()


@ISOLATION.register("process", summary="worker processes, killed and replaced on a timeout or a crash")
class WorkerPool:
    """`workers` processes started at the first batch and reused; stopped by `close()`, when the pool is
    garbage collected, or at interpreter exit."""

    def __init__(self, fn: Callable, *, workers: int = 4, memory_mb: int | None = None):
        if memory_mb is not None and (isinstance(memory_mb, bool) or not isinstance(memory_mb, int)
                                      or memory_mb <= 0):
            raise ValueError(f"memory_mb must be a positive whole number of megabytes, got {memory_mb!r}")
        self.target, self.name = reference(fn), getattr(fn, "__name__", repr(fn))
        self.size, self.memory_mb = workers, memory_mb
        self.workers: list[_Worker] = []
        weakref.finalize(self, _stop_all, self.workers, os.getpid())

    def run(self, calls: Sequence[Call], timeout_s: float) -> list[Outcome]:
        if not calls:
            return []
        self._start()
        outcomes: list[Outcome | None] = [None] * len(calls)
        todo = deque(range(len(calls)))
        deadline = time.monotonic() + timeout_s
        while todo or self._busy():
            self._dispatch(calls, todo, outcomes)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready = connection.wait([w.conn for w in self.workers], left)
            for worker in [w for w in self.workers if w.conn in ready]:
                self._collect(worker, outcomes)
        for worker in self._busy():
            outcomes[worker.index] = _timed_out(timeout_s, "its worker process was killed")
            self._replace(worker)
        return [o or _timed_out(timeout_s, "not started: every worker was busy") for o in outcomes]

    def close(self) -> None:
        _stop_all(self.workers, os.getpid())

    def _start(self) -> None:
        while len(self.workers) < self.size:
            self.workers.append(_Worker(self.target, self.memory_mb))
        for worker in self.workers:
            if not worker.ready:
                worker.await_ready(self.name)

    def _busy(self) -> list[_Worker]:
        return [w for w in self.workers if w.index is not None]

    def _dispatch(self, calls: Sequence[Call], todo: deque, outcomes: list) -> None:
        for worker in self.workers:
            if not todo:
                return
            if worker.ready and worker.index is None:
                index = todo.popleft()
                try:
                    payload = pickle.dumps(calls[index])
                except Exception as err:  # noqa: BLE001 - an argument that cannot be sent fails its call
                    outcomes[index] = Outcome(error=f"could not send the call to a worker: {err}")
                    continue
                try:
                    worker.conn.send_bytes(payload)
                    worker.index = index
                except OSError:       # it just died: the socket's end of file reports it
                    todo.appendleft(index)

    def _collect(self, worker: _Worker, outcomes: list) -> None:
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            if worker.index is not None:
                outcomes[worker.index] = Outcome(error=_death(worker.stop()))
            self._replace(worker)
            return
        if not worker.ready:
            worker.ready = True       # a replacement that cannot load answers each call with the reason
        else:
            outcomes[worker.index], worker.index = message, None

    def _replace(self, worker: _Worker) -> None:
        worker.stop()
        self.workers[self.workers.index(worker)] = _Worker(self.target, self.memory_mb)
