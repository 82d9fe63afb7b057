"""The training loop: accumulation, non-finite policy, atomic checkpoints, resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignkit.config import build
from alignkit.models import tiny_model_and_tokenizer, tiny_reward_model
from alignkit.train import NonFiniteError, RunConfig, train
from alignkit.train.checkpoint import latest_checkpoint, load_checkpoint


def _cfg(tmp_path, **sections) -> RunConfig:
    data = {"output_dir": str(tmp_path), "data": {"task_size": 48, "eval_size": 16},
            "train": {"steps": 3, "batch_size": 8, "lr": 1e-3, "progress": False}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return build(RunConfig, data)


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("command,loss", [("sft", "dpo"), ("preference", "dpo"), ("preference", "ipo"),
                                          ("preference", "simpo"), ("preference", "bco"),
                                          ("preference", "r3m_dpo"), ("preference", "kto"),
                                          ("reward", "bradley_terry"), ("reward", "r3m")])
def test_micro_batching_and_accumulation_give_the_full_batch_gradient(tmp_path, command, loss):
    """One step of batch 8 as 1x8, 8x1 and 3+3+2 micro-batches: the same accumulated gradient."""
    model, tok = tiny_model_and_tokenizer(seed=0)
    model = tiny_reward_model(model) if command == "reward" else model
    result = train(_cfg(tmp_path, loss={"name": loss}, train={"steps": 1}), command,
                    model=model, tokenizer=tok)
    trainer, loop = result.method, result.loop
    ids = trainer.batch_indices(1)
    state = trainer.objective.state_dict()
    grads = []

    def capture():
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    loop.optimizer.step = capture
    for micro in (8, 1, 3):
        trainer.micro = micro
        trainer.objective.load_state_dict(state)
        trainer.train_step(loop, ids)
    assert grads[0] and all(g.keys() == grads[0].keys() for g in grads)
    for other in grads[1:]:
        for name, value in grads[0].items():
            torch.testing.assert_close(other[name], value, atol=1e-6, rtol=1e-4, msg=name)


def test_training_changes_weights_and_writes_the_run_directory(tmp_path):
    model, tok = tiny_model_and_tokenizer(seed=0)
    before = _params(model)
    result = train(_cfg(tmp_path), "preference", model=model, tokenizer=tok)
    assert any(not torch.equal(before[k], v) for k, v in _params(model).items())
    run = result.run.path
    for name in ("config.yaml", "manifest.json", "metrics.jsonl", "reference_logps.safetensors"):
        assert (run / name).exists(), name
    assert latest_checkpoint(run / "checkpoints") is not None
    exported = AutoModelForCausalLM.from_pretrained(run / "model")
    for name, value in exported.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name
    steps = [r["step"] for r in result.run.metrics() if "train/loss" in r]
    assert steps == [1, 2, 3]
    assert "eval/preference_accuracy" in result.metrics


def _poison_logprobs(monkeypatch, poisoned_call):
    """Make the `poisoned_call`-th log-prob computation return non-finite values."""
    import alignkit.train.objectives as objectives

    real, calls = objectives.token_logprobs, {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        lp = real(*args)
        return lp * float("nan") if poisoned_call(calls["n"]) else lp

    monkeypatch.setattr(objectives, "token_logprobs", poisoned)


def test_nonfinite_loss_stops_and_keeps_the_weights(tmp_path, monkeypatch):
    model, tok = tiny_model_and_tokenizer(seed=0)
    _poison_logprobs(monkeypatch, lambda n: n > 4)
    with pytest.raises(NonFiniteError, match="non-finite loss at step"):
        train(_cfg(tmp_path, train={"steps": 5}), "sft", model=model, tokenizer=tok)
    saved = latest_checkpoint(next(tmp_path.glob("sft-*")) / "checkpoints")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    on_disk, _ = tiny_model_and_tokenizer(seed=1)
    assert load_checkpoint(saved, torch.nn.ModuleDict({"model": on_disk}), None)["step"] >= 1
    assert all(torch.equal(on_disk.state_dict()[k], v) for k, v in model.state_dict().items())


def test_nonfinite_skip_policy_counts_and_goes_on(tmp_path, monkeypatch):
    model, tok = tiny_model_and_tokenizer(seed=0)
    _poison_logprobs(monkeypatch, lambda n: n == 3)
    result = train(_cfg(tmp_path, train={"steps": 4, "on_nonfinite": "skip"}), "sft", model=model, tokenizer=tok)
    events = [r for r in result.run.metrics() if r.get("event") == "skipped_nonfinite"]
    assert len(events) == 1 and "non-finite loss" in events[0]["detail"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    trained = [r["step"] for r in result.run.metrics() if "train/loss" in r]
    assert len(trained) == 3 and events[0]["step"] not in trained


def test_crash_during_checkpoint_save_leaves_previous_checkpoint_usable(tmp_path, monkeypatch):
    import alignkit.train.checkpoint as checkpoint

    model, tok = tiny_model_and_tokenizer(seed=0)
    result = train(_cfg(tmp_path, train={"steps": 2}), "sft", model=model, tokenizer=tok)
    root = result.run.checkpoints
    good = latest_checkpoint(root)

    def dies_mid_write(tree, stem):
        Path(f"{stem}.json").write_text("{partial")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(checkpoint, "_write_tree", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        result.loop.step += 1
        result.loop.save()
    assert latest_checkpoint(root) == good
    assert json.loads((good / "complete").read_text())["step"] == 2


def _run_cli(run_root: Path, *extra: str, resume: Path | None = None) -> subprocess.Popen:
    args = [sys.executable, "-m", "alignkit.cli", "preference", "--loss", "dpo", "--model", "tiny"]
    args += ["--resume", str(resume)] if resume else [
        f"output_dir={run_root}", "run_name=run", "data.task_size=200", "data.eval_size=16",
        "model.tiny.hidden_size=128",
        "train.steps=40", "train.batch_size=16", "train.save_every=2", "train.lr=1e-3",
        "train.keep_checkpoints=3", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def _final_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "model" / "model.safetensors")


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    killed = _run_cli(tmp_path / "killed")
    run = tmp_path / "killed" / "run"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and killed.poll() is None:
        ckpt = latest_checkpoint(run / "checkpoints") if (run / "checkpoints").exists() else None
        if ckpt is not None and int(ckpt.name.split("-")[1]) >= 4:
            break
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    interrupted_at = int(latest_checkpoint(run / "checkpoints").name.split("-")[1])
    assert interrupted_at < 40, "the run finished before it could be killed"
    straight = _run_cli(tmp_path / "straight")
    resumed = _run_cli(tmp_path, resume=run)
    assert straight.wait(timeout=300) == 0, straight.stdout.read().decode()
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read().decode()
    a, b = _final_weights(tmp_path / "straight" / "run"), _final_weights(run)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in logged if "train/loss" in r]
    assert steps == list(range(1, 41)), "every step logged exactly once across the kill"


def test_bf16_autocast_runs_on_cpu_when_asked(tmp_path):
    model, tok = tiny_model_and_tokenizer(seed=0)
    result = train(_cfg(tmp_path, train={"precision": "bf16"}), "preference", model=model, tokenizer=tok)
    assert all(torch.isfinite(torch.tensor(v)) for v in result.metrics.values())
    assert next(model.parameters()).dtype == torch.float32, "autocast keeps fp32 master weights"


def test_progress_prints_plain_lines_when_not_a_terminal(capsys):
    from alignkit.train.progress import ProgressReporter

    reporter = ProgressReporter(total=3, description="run", every_s=0)
    assert not reporter.live
    for step in (1, 2, 3):
        reporter.update(step, {"loss": 0.5, "tokens_per_s": 1234.0})
    reporter.close()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 3 and "run step 3/3" in lines[-1] and "loss 0.5000" in lines[-1]
    assert "1234 tok/s" in lines[-1] and "eta 0s" in lines[-1]


def test_progress_draws_a_live_bar_on_a_terminal(monkeypatch):
    import io

    from rich.console import Console

    from alignkit.train import progress

    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: True, raising=False)
    screen = io.StringIO()
    reporter = progress.ProgressReporter(total=4, description="run",
                                         console=Console(file=screen, force_terminal=True, width=120))
    assert reporter.live
    reporter.update(2, {"loss": 0.25, "tokens_per_s": 99.0})
    reporter.close()
    assert "2/4" in screen.getvalue() and "loss 0.2500" in screen.getvalue()


def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path, capsys):
    """A run directory someone sent: its checkpoint's DCP metadata is a pickle payload. `--resume` must stop
    with a clear error before anything is unpickled."""
    import pickle

    from alignkit.cli import main

    assert main(["sft", "--model", "tiny", f"output_dir={tmp_path}", "run_name=run", "data.task_size=16",
                 "data.eval_size=4", "train.steps=1", "train.progress=false"]) == 0
    marker = tmp_path / "payload-ran"
    metadata = latest_checkpoint(tmp_path / "run" / "checkpoints") / "dcp" / ".metadata"
    metadata.write_bytes(pickle.dumps(_Payload(marker)))
    capsys.readouterr()
    assert main(["sft", "--resume", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert "not unpickled" in error and str(metadata) in error
    assert not marker.exists()


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ----- checkpoints that recover -----
def _sft_cfg(tmp_path, name: str, **train):
    return _cfg(tmp_path, run_name=name, train={"steps": 4, "save_every": 1, "keep_checkpoints": 3, **train})


def _final(run) -> dict:
    from safetensors.torch import load_file

    return load_file(run.path / "model" / "model.safetensors")


def test_a_damaged_latest_checkpoint_is_named_and_the_one_before_is_used(tmp_path, caplog):
    straight = train(_sft_cfg(tmp_path, "straight"), "sft", model=tiny_model_and_tokenizer(seed=0)[0],
                     tokenizer=tiny_model_and_tokenizer()[1])
    model, tok = tiny_model_and_tokenizer(seed=0)
    cfg = _sft_cfg(tmp_path, "damaged")
    run = train(cfg, "sft", model=model, tokenizer=tok).run   # the same run; then its last checkpoint is damaged
    latest = latest_checkpoint(run.checkpoints)
    for tensors in (latest / "dcp").glob("*.distcp"):
        tensors.write_bytes(tensors.read_bytes()[:100])        # truncated, as by a crash mid-copy
    with caplog.at_level("WARNING", logger="alignkit"):
        resumed = train(cfg, "sft", resume=run.path, model=tiny_model_and_tokenizer(seed=0)[0], tokenizer=tok)
    assert f"skipping damaged checkpoint {latest}" in caplog.text and "truncated or damaged" in caplog.text
    for name, weight in _final(straight.run).items():
        assert torch.equal(_final(resumed.run)[name], weight), name


def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_zero(tmp_path, caplog):
    import shutil

    model, tok = tiny_model_and_tokenizer(seed=0)
    first = train(_sft_cfg(tmp_path, "first"), "sft", model=model, tokenizer=tok)
    shutil.rmtree(first.run.checkpoints)                        # as if killed before the first save
    shutil.rmtree(first.run.path / "model")
    with caplog.at_level("WARNING", logger="alignkit"):
        again = train(_sft_cfg(tmp_path, "first"), "sft", resume=first.run.path,
                      model=tiny_model_and_tokenizer(seed=0)[0], tokenizer=tok)
    assert "starting again from step 0" in caplog.text and again.run.path == first.run.path
    trained = [r["step"] for r in again.run.metrics() if "train/loss" in r]
    assert trained == [1, 2, 3, 4], "every step logged once"
    assert sum(r.get("event") == "data" for r in again.run.metrics()) == 1


def test_a_full_disk_during_a_save_names_the_folder_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    import errno

    import alignkit.train.checkpoint as checkpoint
    from alignkit.train.checkpoint import CheckpointWriteError

    model, tok = tiny_model_and_tokenizer(seed=0)
    result = train(_sft_cfg(tmp_path, "full", steps=2), "sft", model=model, tokenizer=tok)
    root, good = result.run.checkpoints, latest_checkpoint(result.run.checkpoints)

    def no_space(tree, stem):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_tree", no_space)
    result.loop.step += 1
    with pytest.raises(CheckpointWriteError, match=f"could not write a checkpoint in {root}.*No space left"):
        result.loop.save()
    assert latest_checkpoint(root) == good and not list(root.glob(".step-*.tmp"))
