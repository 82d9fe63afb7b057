"""A resumed run continues its tracker runs: one run per tracker, every step once, read back through each library."""

import json
import shutil

import pytest

from alignkit.config import build
from alignkit.models import tiny_model_and_tokenizer
from alignkit.train import RunConfig, train
from tests.test_tracking import _wandb_records, offline_trackers

STEPS = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with offline_trackers(tmp_path_factory.mktemp("trackers-resume"), TRACKIO_PROJECT="resume") as home:
        yield home


def _resumed(root, report_to: str, kept: int):
    """Four steps with a checkpoint every two, the checkpoints after step `kept` removed, then resumed:
    steps kept+1..4 are logged by both sessions."""
    cfg = build(RunConfig, {"output_dir": str(root), "data": {"task_size": 16, "eval_size": 4},
                            "train": {"steps": 4, "batch_size": 4, "lr": 1e-3, "progress": False, "save_every": 2,
                                      "keep_checkpoints": 5, "report_to": report_to}})
    model, tok = tiny_model_and_tokenizer(seed=0)
    run = train(cfg, "sft", model=model, tokenizer=tok).run
    for checkpoint in run.checkpoints.glob("step-*"):
        if int(checkpoint.name.removeprefix("step-")) > kept:
            shutil.rmtree(checkpoint)
    model, tok = tiny_model_and_tokenizer(seed=0)
    return train(cfg, "sft", resume=run.path, model=model, tokenizer=tok).run


@pytest.fixture(scope="module")
def run(home, tmp_path_factory):
    return _resumed(tmp_path_factory.mktemp("runs"), "tensorboard,wandb,mlflow,trackio", kept=2)


def _series(run, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in run.metrics() if key in r}


def _tensorboard(run, key: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run.path / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(key)]


def test_tensorboard_drops_what_the_first_session_logged_after_the_checkpoint(run):
    got = _tensorboard(run, "train/loss")
    assert [step for step, _ in got] == STEPS
    assert dict(got) == pytest.approx(_series(run, "train/loss"), rel=1e-6)
    assert [step for step, _ in _tensorboard(run, "eval/loss")] == [0, 4]


def test_mlflow_continues_the_saved_run_and_holds_each_step_once(run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run.path / 'mlflow.db'}")
    [found] = client.search_runs([client.get_experiment_by_name("alignkit").experiment_id])
    assert found.info.run_id == json.loads((run.path / "trackers.json").read_text())["mlflow"]["run_id"]
    assert found.info.status == "FINISHED"
    history = client.get_metric_history(found.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == STEPS
    assert {m.step: m.value for m in history} == pytest.approx(_series(run, "train/loss"))


def test_wandb_sessions_share_one_run_id(run, home):
    ids = {record.run.run_id for path in (home / "wandb" / "wandb").glob("offline-run-*/run-*.wandb")
           for record in _wandb_records(path)
           if record.WhichOneof("record_type") == "run" and record.run.display_name == run.path.name}
    assert len(list((home / "wandb" / "wandb").glob("offline-run-*"))) == 2 and len(ids) == 1
    assert ids == {json.loads((run.path / "trackers.json").read_text())["wandb"]["id"]}


def test_trackio_continues_the_run_of_the_same_name(run):
    from trackio import SQLiteStorage

    assert SQLiteStorage.get_runs("resume") == [run.path.name]
    steps = [row["step"] for row in SQLiteStorage.get_logs("resume", run.path.name) if "train/loss" in row]
    assert sorted(steps) == STEPS


def test_a_run_that_starts_over_purges_every_earlier_event(tmp_path, home):
    """Killed before its first checkpoint, the resumed run starts over in place: TensorBoard keeps only the
    new session's events, config summary included (read as the TensorBoard app reads them)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    run = _resumed(tmp_path, "tensorboard", kept=0)
    assert [step for step, _ in _tensorboard(run, "train/loss")] == STEPS
    events = EventAccumulator(str(run.path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Tensors("train/loss")] == STEPS
    assert len(events.Tensors("config/text_summary")) == 1
