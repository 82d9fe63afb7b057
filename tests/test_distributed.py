"""Two ranks under torchrun (gloo, CPU, FSDP2) against one process: the same gradients, weights and samples.

The two ranks run every trainer with micro-batches of 1; this process runs them with whole batches, so
each comparison covers world size and micro-batching at once. Tolerances are float32 reduction-order
noise: gradients to 1e-5 relative; weights after two AdamW steps to a tenth of a step, 1e-4 offline (lr 1e-3)
and 1e-3 online (lr 1e-2) absolute (Adam's m / sqrt(v) turns reduction-order noise in a near-zero gradient into
up to a whole step: PPO's measured 1.8e-4).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dist_workers.train_worker import ANY_BATCH, CASES, LOOSE, ONLINE, SELF_IMPROVING, UNTRAINED, run_cases
from safetensors.torch import load_file
from torchrun import ROOT, torchrun, torchrun_command, worker_env

from alignkit.cli import main
from alignkit.train.checkpoint import latest_checkpoint

WORKER = Path(__file__).parent / "dist_workers" / "train_worker.py"
pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two-ranks")
    torchrun(str(WORKER), str(out), timeout=400)
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one-process")
    run_cases(out, micro=None)
    return out


SAME_BATCH = [c for c in CASES if c not in ANY_BATCH | UNTRAINED]


@pytest.mark.parametrize("case", SAME_BATCH)
def test_two_ranks_compute_the_gradient_of_one_process(two_ranks, one_process, case):
    ours, theirs = (load_file(d / f"{case}.grads.safetensors") for d in (one_process, two_ranks))
    assert ours.keys() == theirs.keys() and ours
    assert any(g.abs().sum() > 0 for g in ours.values()), "a zero gradient would prove nothing"
    if case in LOOSE:
        error = sum((theirs[n] - g).norm() ** 2 for n, g in ours.items()) ** 0.5
        assert error <= LOOSE[case] * sum(g.norm() ** 2 for g in ours.values()) ** 0.5
        return
    for name, grad in ours.items():
        torch.testing.assert_close(theirs[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("case", [c for c in SAME_BATCH if c not in LOOSE])
def test_two_ranks_end_with_the_weights_of_one_process(two_ranks, one_process, case):
    ours, theirs = (_weights(d / "runs" / case) for d in (one_process, two_ranks))
    assert ours.keys() == theirs.keys()
    atol = 1e-3 if case in ONLINE or case in SELF_IMPROVING else 1e-4   # a tenth of a step at their lr of 1e-2
    for name, weight in ours.items():
        torch.testing.assert_close(theirs[name], weight, rtol=0, atol=atol, msg=name)


def test_dynamic_sampling_gives_every_rank_an_equal_share(two_ranks):
    rows = [json.loads(line) for line in (two_ranks / "runs" / "dapo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/groups" in r]
    assert len(steps) == 2 and all(r["train/groups"] % 2 == 0 and r["train/groups"] > 0 for r in steps)
    shares = [json.loads((two_ranks / f"dapo.tokens.rank-{r}.json").read_text()) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) > 0, "each rank trains on as many completions"


@pytest.mark.parametrize("case", [c for c in ONLINE if c not in ANY_BATCH])
def test_two_ranks_sample_the_completions_of_one_process(two_ranks, one_process, case):
    ours = json.loads((one_process / f"{case}.tokens.rank-0.json").read_text())
    theirs = [t for r in (0, 1) for t in json.loads((two_ranks / f"{case}.tokens.rank-{r}.json").read_text())]
    assert len(ours) == len(theirs) > 0
    assert ours == theirs


def test_the_policy_judges_itself_in_lockstep_at_two_ranks(two_ranks, one_process):
    def rounds(root):
        rows = [json.loads(line) for line in (root / "runs" / "self-rewarding-lm" / "metrics.jsonl").read_text()
                .splitlines()]
        return [(r["train/reward/items"], r["train/comparisons"]) for r in rows if "train/comparisons" in r]

    assert rounds(two_ranks) == rounds(one_process) == [(16, 0), (16, 0)]


# ----- a rank killed mid-run: the job ends, and --resume continues at the same or another world size -----
def _dpo(root: Path, *, resume: Path | None = None) -> list[str]:
    args = ["-m", "alignkit.cli", "preference", "--loss", "dpo"]
    return args + (["--resume", str(resume)] if resume else [
        "--model", "tiny", f"output_dir={root}", "run_name=run", "model.tiny.hidden_size=128", "data.task_size=200",
        "data.eval_size=8", "train.steps=30", "train.batch_size=8", "train.save_every=1", "train.keep_checkpoints=2",
        "train.lr=1e-3", "train.progress=false"])


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _wait_for_checkpoint(job: subprocess.Popen, root: Path, step: int, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and job.poll() is None:
        latest = latest_checkpoint(root) if root.exists() else None
        if latest is not None and int(latest.name.split("-")[1]) >= step:
            return
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint {step} in time (exit code {job.poll()})")


def _weights(run: Path) -> dict:
    """The final model's tensors (a preference model keeps its head in a file of its own)."""
    folder = run / "model"
    return {f"{f.stem}:{name}": t for f in sorted(folder.glob("*.safetensors")) for name, t in load_file(f).items()}


def test_a_killed_rank_ends_the_job_then_resume_matches_the_uninterrupted_run(tmp_path):
    run = tmp_path / "killed" / "run"
    job = subprocess.Popen(torchrun_command(*_dpo(tmp_path / "killed")), env=worker_env(), cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_checkpoint(job, run / "checkpoints", 3)
    os.kill(_children(job.pid)[-1], signal.SIGKILL)
    killed_at = time.monotonic()
    output, _ = job.communicate(timeout=120)
    assert time.monotonic() - killed_at < 60, "the surviving rank must not hang"
    assert job.returncode != 0 and "SIGKILL" in output
    assert int(latest_checkpoint(run / "checkpoints").name.split("-")[1]) < 30, "finished before the kill"
    shutil.copytree(run, tmp_path / "to-one-process")

    torchrun(*_dpo(tmp_path, resume=run))
    torchrun(*_dpo(tmp_path / "straight"))
    resumed, straight = _weights(run), _weights(tmp_path / "straight" / "run")
    for name, weight in straight.items():
        assert torch.equal(resumed[name], weight), f"{name}: resume at the same world size is bit-exact"
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "train/loss" in r] == list(range(1, 31))

    assert main(_dpo(tmp_path, resume=tmp_path / "to-one-process")[2:]) == 0   # 2 ranks -> 1 process
    for name, weight in _weights(tmp_path / "to-one-process").items():
        torch.testing.assert_close(weight, straight[name], rtol=0, atol=1e-4, msg=name)
