"""TransformersGenerator in lockstep: two ranks (torchrun, gloo on CPU) sharing an FSDP2-sharded model
generate for different numbers of prompts without deadlocking, and get what one unsharded process gets."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from alignkit.models import tiny_model, tiny_tokenizer
from alignkit.rollout import SamplingConfig, TransformersGenerator

WORKER = Path(__file__).parent / "dist_workers" / "rollout_worker.py"

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of the two ranks wrote (one torchrun launch for the module)."""
    outdir = tmp_path_factory.mktemp("rollout-dist")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(WORKER), str(outdir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, env=env, cwd=Path(__file__).parents[1], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return [json.loads((outdir / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_ranks_run_the_model_equally_often_on_different_work(ranks):
    assert len(ranks[0]["prompts"]) != len(ranks[1]["prompts"])
    assert ranks[0]["forwards"] == ranks[1]["forwards"]
    lengths = {len(t) for rank in ranks for t in rank["token_ids"]}
    assert len(lengths) > 2   # rows finish at different steps


def test_sharded_lockstep_matches_one_unsharded_process(ranks):
    model, tokenizer = tiny_model(seed=0), tiny_tokenizer()
    for rank in ranks:
        sampling = SamplingConfig(**{**rank["sampling"], "stop": tuple(rank["sampling"]["stop"])})
        generator = TransformersGenerator(model, tokenizer, batch_size=rank["batch_size"])
        expected = generator.generate(rank["prompts"], sampling, seed=rank["seeds"])
        assert rank["token_ids"] == [c.token_ids for c in expected]
        assert rank["finish_reasons"] == [c.finish_reason for c in expected]
        for got, want in zip(rank["logprobs"], expected, strict=True):
            assert torch.allclose(torch.tensor(got), torch.tensor(want.logprobs), atol=1e-5)
