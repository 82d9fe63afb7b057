"""The generation worker behind `alignkit serve`: one thread owns the model and answers queued jobs in batches.

Request threads check and tokenise requests, then `submit` a `Job` (one row per choice: prompt ids
and a seed) to a bounded `JobQueue`; a full queue refuses at once. The worker takes the jobs
waiting, in order, up to `max_batch` rows, and generates the jobs of each sampling setting in one
call of the rollout engine (`TransformersGenerator`: left padding, a KV cache, a row leaves the
batch when it finishes). Every row draws from its own seed, so a seeded job gets the same answer
whatever it is batched with (up to float rounding of the batched forward pass).

Log-probs come from one more forward pass over prompt and answer: log-softmax of the raw logits
(before temperature), the chosen token and the top-k alternatives, as `LocalBackend` reports them.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict, deque
from contextlib import contextmanager
from dataclasses import astuple, dataclass, field

import torch

from alignkit.judges.backends import Generation, rank_steps, ranked_tokens
from alignkit.rollout.base import Completion, SamplingConfig
from alignkit.rollout.hf import TransformersGenerator

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds as many jobs as it may."""


class Stopped(Exception):
    """The worker has stopped (the server is shutting down)."""


class GenerationFailed(Exception):
    """The model raised while generating a batch; every job of the batch gets this."""


@dataclass
class Job:
    """One request: a row per choice (prompt ids and seed), their sampling, and how many alternatives
    per token to report (0: no log-probs). `answers` (one per row) or `error` is set when `done`."""

    prompts: list[list[int]]
    seeds: list[int]
    sampling: SamplingConfig
    top_logprobs: int = 0
    answers: list[Generation] | None = None
    error: Exception | None = None
    done: threading.Event = field(default_factory=threading.Event, repr=False)

    def finish(self, answers: list[Generation] | None = None, error: Exception | None = None) -> None:
        self.answers, self.error = answers, error
        self.done.set()


class JobQueue:
    """Jobs waiting for the worker, at most `capacity` of them."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"the queue needs room for at least one request, got {capacity}")
        self.capacity = capacity
        self._jobs: deque[Job] = deque()
        self._changed = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        return len(self._jobs)

    def put(self, job: Job) -> None:
        with self._changed:
            if self._closed:
                raise Stopped("the server is shutting down")
            if len(self._jobs) >= self.capacity:
                raise QueueFull(f"{self.capacity} requests are already waiting")
            self._jobs.append(job)
            self._changed.notify()

    def take(self, max_rows: int) -> list[Job]:
        """Wait for a job; take it and those after it while their rows fit in `max_rows`. [] once closed."""
        with self._changed:
            self._changed.wait_for(lambda: self._jobs or self._closed)
            if self._closed:
                return []
            taken = [self._jobs.popleft()]
            rows = len(taken[0].prompts)
            while self._jobs and rows + len(self._jobs[0].prompts) <= max_rows:
                rows += len(self._jobs[0].prompts)
                taken.append(self._jobs.popleft())
            return taken

    def close(self) -> list[Job]:
        """Refuse new jobs, wake the worker, and hand back the jobs that were still waiting."""
        with self._changed:
            self._closed = True
            left = list(self._jobs)
            self._jobs.clear()
            self._changed.notify_all()
            return left


@dataclass
class WorkerStats:
    batches: int = 0         # calls of the rollout engine
    generating: int = 0      # rows in the batch being generated now
    rows: int = 0            # rows (choices) generated
    largest_batch: int = 0   # the most rows in one call


class GenerationWorker:
    """The one thread that uses the model: takes queued jobs and generates them in batches."""

    def __init__(self, model, tokenizer, *, max_batch: int, queue_size: int):
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.engine = TransformersGenerator(model, tokenizer, batch_size=max_batch, lockstep=False)
        self.queue = JobQueue(queue_size)
        self.stats = WorkerStats()
        self._thread = threading.Thread(target=self._serve, name="alignkit-serve-generation", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job`; raises QueueFull or Stopped at once instead of waiting."""
        self.queue.put(job)

    def stop(self) -> None:
        """Fail the waiting jobs, let the batch in progress finish, and end the thread."""
        for job in self.queue.close():
            job.finish(error=Stopped("the server is shutting down"))
        self._thread.join()

    def _serve(self) -> None:
        while jobs := self.queue.take(self.max_batch):
            groups = defaultdict(list)
            for job in jobs:
                groups[astuple(job.sampling)].append(job)
            for group in sorted(groups.values(), key=lambda g: g[0].sampling.max_new_tokens):  # short ones first
                self._generate(group)

    def _generate(self, jobs: list[Job]) -> None:
        rows = [prompt for job in jobs for prompt in job.prompts]
        self.stats.generating = len(rows)
        try:
            with _eval_mode(self.model):
                completions = self.engine.generate(rows, jobs[0].sampling, [s for job in jobs for s in job.seeds])
                answers = [self._answer(c, job) for job, c in zip(_owners(jobs), completions, strict=True)]
        except Exception as err:  # a failed batch fails its jobs, never the worker
            log.exception("alignkit serve: generation failed")
            for job in jobs:
                job.finish(error=GenerationFailed(f"generation failed: {type(err).__name__}: {err}"))
            return
        finally:
            self.stats.generating = 0
        self.stats.batches += 1
        self.stats.rows += len(rows)
        self.stats.largest_batch = max(self.stats.largest_batch, len(rows))
        for job in jobs:
            job.finish(answers[:len(job.prompts)])
            answers = answers[len(job.prompts):]

    def _answer(self, completion: Completion, job: Job) -> Generation:
        ended_on_eos = completion.finish_reason == "eos"
        kept = completion.token_ids[:-1] if ended_on_eos else completion.token_ids
        text = completion.text
        if completion.finish_reason == "stop":   # the engine keeps the stop string; the API does not
            text = text[:min(text.find(s) for s in job.sampling.stop if s in text)]
        answer = Generation(text, prompt_tokens=len(completion.prompt_ids),
                            completion_tokens=len(completion.token_ids),
                            finish_reason="length" if completion.finish_reason == "length" else "stop")
        if job.top_logprobs:
            answer.tokens = [self.tokenizer.decode([t]) for t in kept]
            answer.top_logprobs = self._ranked(completion.prompt_ids, kept, job.top_logprobs)
        return answer

    def _ranked(self, prompt: list[int], tokens: list[int], k: int) -> list[dict[str, float]]:
        """Per generated token: {text: logprob} of the token and the top-k, from one forward pass."""
        if not tokens:
            return []
        ids = torch.tensor([prompt + tokens], device=next(self.model.parameters()).device)
        with torch.inference_mode():
            logits = self.model(input_ids=ids).logits[0, len(prompt) - 1:-1]
        ranked = rank_steps(logits[:, None], ids[:, len(prompt):], k)
        return ranked_tokens(self.tokenizer, tokens, *(t[0].tolist() for t in ranked))


def _owners(jobs: list[Job]) -> list[Job]:
    """The job of each row, in row order."""
    return [job for job in jobs for _ in job.prompts]


@contextmanager
def _eval_mode(model):
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)
