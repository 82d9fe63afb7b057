"""Think-RM stage 1 end to end, and generative judges on real models: in process and over real HTTP.

A tiny judge is trained once per module with `judge-sft` on the cipher task's judgement traces;
it learns the answer format in a short run (its verdicts are not yet good: that takes a longer
run, see docs/judges.md). The same judge then answers in process, through `alignkit serve`'s
server on loopback, and through servers that time out or die mid-run.
"""

import json
import threading
import time

import pytest

from alignkit.cli import main
from alignkit.data.loaders import load_records
from alignkit.judges.backends import HTTPBackend, LocalBackend
from alignkit.judges.generative import GenerativeJudge
from alignkit.serve import ChatHandler, ChatServer, prompt_limit, serving
from alignkit.tasks.cipher import CipherTask
from alignkit.train import config_from, train

PAIRS, _ = CipherTask().comparisons(12, seed=10_000)
PROMPTS, CHOSEN, REJECTED = ([getattr(p, f) for p in PAIRS] for f in ("prompt", "chosen", "rejected"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def judge_run(tmp_path_factory):
    cfg = config_from({"model": {"name": "tiny"}, "output_dir": str(tmp_path_factory.mktemp("runs")),
                       "data": {"task_size": 2000, "eval_size": 32},
                       "train": {"steps": 120, "batch_size": 16, "lr": 3e-3, "warmup_steps": 10,
                                 "progress": False}})
    return train(cfg, "judge-sft")


def http(url: str, **options) -> HTTPBackend:
    return HTTPBackend(url, **{"timeout_s": 10, "retries": 1, "backoff_s": 0.01, **options})


def wait_until_idle(server: ChatServer, timeout_s: float = 30) -> None:
    deadline = time.perf_counter() + timeout_s
    while server.counters.in_flight and time.perf_counter() < deadline:
        time.sleep(0.05)


def test_judge_sft_learns_the_answer_format(judge_run):
    metrics = [json.loads(line) for line in (judge_run.run.path / "metrics.jsonl").read_text().splitlines()]
    losses = [m["eval/loss"] for m in metrics if "eval/loss" in m]
    assert losses[-1] < 0.5 * losses[0]
    judge = GenerativeJudge(LocalBackend(judge_run.model, judge_run.tokenizer, batch_size=12), max_tokens=160,
                            on_unparsable="abstain")
    preference = judge.compare(PROMPTS, CHOSEN, REJECTED)
    assert judge.outcomes["unparsable"] <= 2                     # of 24 answers (both orders)
    assert preference.failed.sum() == 0
    assert ((preference.probs >= 0) & (preference.probs <= 1)).all()


def test_eval_rm_evaluates_the_trained_judge_from_its_run_directory(judge_run, capsys):
    code = main(["eval-rm", "task:cipher:8", "--json", "--source",
                 f"judge:{judge_run.run.path},max_tokens=160,on_unparsable=abstain,batch_size=16"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)["sources"][0]
    assert report["pairs"] == 8 and report["failed"] <= 1
    assert report["source_metrics"]["source/backend/completion_tokens"] > 0


def test_judgement_records_load_and_reject_a_bad_verdict(tmp_path):
    path = tmp_path / "traces.jsonl"
    path.write_text(json.dumps({"prompt": "2+2?", "a": "4", "b": "5", "verdict": "a", "reasoning": "A adds up."})
                    + "\n" + json.dumps({"prompt": "q", "a": "x", "b": "y", "verdict": "C"}) + "\n")
    with pytest.raises(ValueError, match="line 2, field 'verdict': expected one of A, B, tie"):
        load_records(path, "judgement")
    (record,) = load_records(path, "judgement", on_error="skip").records
    assert record.verdict == "A" and record.reasoning == "A adds up."


def test_http_judge_gives_the_local_judges_soft_verdicts(judge_run):
    model, tokenizer = judge_run.model, judge_run.tokenizer
    local = GenerativeJudge(LocalBackend(model, tokenizer, batch_size=1, tokenize=prompt_limit(2048)),
                            max_tokens=160, on_unparsable="abstain")
    with serving(model, tokenizer) as url:
        remote = GenerativeJudge(http(url, max_concurrency=2), max_tokens=160, on_unparsable="abstain")
        over_http = remote.compare(PROMPTS[:4], CHOSEN[:4], REJECTED[:4])
    in_process = local.compare(PROMPTS[:4], CHOSEN[:4], REJECTED[:4])
    assert over_http.probs.tolist() == pytest.approx(in_process.probs.tolist(), abs=1e-4)
    assert any(0 < p < 1 and p != 0.5 for p in over_http.probs.tolist())   # soft, from verdict-token log-probs
    assert remote.metrics("judge")["judge/backend/prompt_tokens"] > 0


def test_a_server_dying_mid_run_keeps_what_was_judged(judge_run):
    class ClosingHandler(ChatHandler):   # once dead, no kept-alive connection is served again
        def handle_one_request(self):
            super().handle_one_request()
            self.close_connection = self.close_connection or self.server.dead

    class DyingServer(ChatServer):
        dead = False

        def finish_request(self, request, client_address):
            ClosingHandler(request, client_address, self)

        def complete(self, request):
            answer = super().complete(request)
            if self.counters.requests == 3:
                self.dead = True
                self.shutdown()
                self.server_close()
            return answer

    backend = LocalBackend(judge_run.model, judge_run.tokenizer, batch_size=1, tokenize=prompt_limit(2048))
    server = DyingServer(("127.0.0.1", 0), backend, "judge")
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    judge = GenerativeJudge(http(server.base_url, max_concurrency=1), swap=False, max_tokens=160,
                            on_unparsable="abstain")
    started = time.perf_counter()
    preference = judge.compare(PROMPTS[:6], CHOSEN[:6], REJECTED[:6])
    assert time.perf_counter() - started < 60
    assert preference.failed.tolist() == [False] * 3 + [True] * 3
    assert judge.outcomes["errors"] == 3 and judge.stats.failures == 3
    assert judge.metrics("judge")["judge/backend/failures"] == 3


def test_a_judge_that_times_out_fails_its_pairs_without_hanging(judge_run):
    class SlowServer(ChatServer):
        def complete(self, request):
            time.sleep(1.0)
            return super().complete(request)

    backend = LocalBackend(judge_run.model, judge_run.tokenizer, batch_size=1, tokenize=prompt_limit(2048))
    server = SlowServer(("127.0.0.1", 0), backend, "judge")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        judge = GenerativeJudge(http(server.base_url, timeout_s=0.2, retries=1), swap=False, max_tokens=20)
        started = time.perf_counter()
        preference = judge.compare(PROMPTS[:2], CHOSEN[:2], REJECTED[:2])
        assert time.perf_counter() - started < 10
        assert preference.failed.tolist() == [True, True] and preference.probs.tolist() == [0.5, 0.5]
        assert judge.backend.stats.timeouts == 2
    finally:
        wait_until_idle(server)   # abandoned requests still generate; let them end before the process does
        server.shutdown()
        server.server_close()
