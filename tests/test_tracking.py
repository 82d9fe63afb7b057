"""train.report_to: each tracker gets metrics.jsonl's numbers, read back through the library's own reader."""

import json
import struct
import subprocess
import sys
from contextlib import contextmanager

import pytest

from alignkit import tracking
from alignkit.config import ConfigError, build
from alignkit.models import tiny_model_and_tokenizer
from alignkit.train import Loop, RunConfig, train


@contextmanager
def offline_trackers(home, **env):
    """Every library offline and inside `home` (trackio reads TRACKIO_DIR once, on import); `env` adds variables."""
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(home / "wandb"),
           "WANDB_CACHE_DIR": str(home / "wandb-cache"), "WANDB_CONFIG_DIR": str(home / "wandb-config"),
           "TRACKIO_DIR": str(home / "trackio"), "HF_HUB_OFFLINE": "1", **env}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        (home / "wandb").mkdir()
        yield home


@pytest.fixture(scope="module")
def tracker_home(tmp_path_factory):
    with offline_trackers(tmp_path_factory.mktemp("trackers")) as home:
        yield home


def _run(tmp_path, report_to: str):
    cfg = build(RunConfig, {"output_dir": str(tmp_path / "runs"), "data": {"task_size": 24, "eval_size": 8},
                            "train": {"steps": 2, "batch_size": 4, "lr": 1e-3, "progress": False,
                                      "report_to": report_to}})
    model, tok = tiny_model_and_tokenizer(seed=0)
    return train(cfg, "sft", model=model, tokenizer=tok).run


def _series(run, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in run.metrics() if key in r}


def test_tensorboard_event_files_hold_the_metrics(tmp_path, tracker_home):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _run(tmp_path, "tensorboard")
    events = EventAccumulator(str(run.path / "tensorboard"))
    events.Reload()
    for key in ("train/loss", "train/lr", "eval/loss"):
        got = {e.step: e.value for e in events.Scalars(key)}
        assert got == pytest.approx(_series(run, key), rel=1e-6), key
    assert "config/text_summary" in events.Tags()["tensors"]


def test_mlflow_local_store_holds_the_metrics_and_config(tmp_path, tracker_home):
    from mlflow.tracking import MlflowClient

    run = _run(tmp_path, "mlflow")
    client = MlflowClient(f"sqlite:///{run.path / 'mlflow.db'}")
    [found] = client.search_runs([client.get_experiment_by_name("alignkit").experiment_id])
    assert found.info.run_name == run.path.name and found.info.status == "FINISHED"
    for key in ("train/loss", "eval/loss"):
        got = {m.step: m.value for m in client.get_metric_history(found.info.run_id, key)}
        assert got == pytest.approx(_series(run, key)), key
    assert found.data.params["train.report_to"] == "mlflow" and found.data.params["command"] == "sft"
    assert (run.path / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()


def _wandb_records(path):
    """The protobuf records of a wandb transaction log (.wandb): a header, then LevelDB-style 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data, pos, payload = path.read_bytes(), 7, b""
    assert data.startswith(b":W&B")
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if room >= 7 else (0, 0, 0)
        if kind == 0:
            pos += room
            continue
        payload, pos = payload + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            payload = b""
            yield record


def test_wandb_offline_run_holds_the_metrics_and_config(tmp_path, tracker_home):
    run = _run(tmp_path, "wandb")
    [offline] = (tracker_home / "wandb" / "wandb").glob("offline-run-*/run-*.wandb")
    history, config = {}, {}
    for record in _wandb_records(offline):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[row["_step"]] = row
        elif kind == "run":
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
            assert record.run.display_name == run.path.name
    for key in ("train/loss", "eval/loss"):
        expected = _series(run, key)
        assert {s: history[s][key] for s in expected} == pytest.approx(expected), key
    assert config["train"]["report_to"] == "wandb" and config["command"] == "sft"


def test_trackio_local_database_holds_the_metrics(tmp_path, tracker_home):
    run = _run(tmp_path, "trackio")
    from trackio import SQLiteStorage

    assert run.path.name in SQLiteStorage.get_runs("alignkit")
    logs = SQLiteStorage.get_logs("alignkit", run.path.name)
    got = {row["step"]: row["train/loss"] for row in logs if "train/loss" in row}
    assert got == pytest.approx(_series(run, "train/loss"))
    assert (tracker_home / "trackio").is_dir()


def test_a_failing_run_still_flushes_its_trackers(tmp_path, tracker_home, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def full_disk(loop, optimizer=True):
        raise OSError("disk full")

    finished, close = [], tracking.TensorBoardTracker.finish
    monkeypatch.setattr(Loop, "save", full_disk)
    monkeypatch.setattr(tracking.TensorBoardTracker, "finish", lambda self: (finished.append(1), close(self)))
    with pytest.raises(OSError, match="disk full"):
        _run(tmp_path, "tensorboard")
    assert finished == [1]
    [path] = (tmp_path / "runs").iterdir()
    events = EventAccumulator(str(path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert [e.step for e in events.Scalars("eval/loss")] == [0, 2]


def test_an_unknown_tracker_fails_before_any_run_directory(tmp_path):
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'; known: mlflow, tensorboard, trackio, wandb"):
        _run(tmp_path, "tensorboard,tensorbord")
    assert not (tmp_path / "runs").exists()


def test_a_missing_library_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install 'alignkit\[tracking\]' \(or pip install wandb\)"):
        tracking.start("wandb", "unused", {}, "run")


def test_names_parse_none_lists_and_duplicates():
    assert tracking.names("none") == tracking.names("") == []
    assert tracking.names(" wandb, mlflow,wandb ") == ["wandb", "mlflow"]
    assert tracking.numeric({"step": 3, "event": "data", "n": 4, "ok": True, "x": 0.5}) == {"n": 4.0, "x": 0.5}


def test_none_imports_no_tracker_library(tmp_path):
    """In a fresh interpreter: a run with the default report_to loads none of the libraries."""
    code = f"""
import sys
from tests.test_tracking import _run
from pathlib import Path
_run(Path({str(tmp_path)!r}), "none")
loaded = [m for m in ("wandb", "mlflow", "trackio", "tensorboard", "torch.utils.tensorboard") if m in sys.modules]
assert not loaded, loaded
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
