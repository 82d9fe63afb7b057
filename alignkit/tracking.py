"""Experiment trackers (`train.report_to`): every metric the run writes to metrics.jsonl, sent on.

Each tracker is a class registered in `TRACKERS` with `start(run_dir, config, run_name)`,
`log(step, metrics)` and `finish()`; its library is imported in `start`, only when chosen. All of them
keep to the run directory by default: TensorBoard event files, wandb offline, a local mlflow SQLite store and
trackio's local database (each overridable with the library's own environment variables).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

from alignkit.config import ConfigError
from alignkit.registry import Registry

TRACKERS = Registry("tracker")
NONE = "none"


def names(report_to: str) -> list[str]:
    """The trackers in a comma-separated `report_to` ("none" or "" for none), checked against the registry."""
    chosen = list(dict.fromkeys(n.strip() for n in str(report_to or "").split(",") if n.strip() not in ("", NONE)))
    unknown = [n for n in chosen if n not in TRACKERS]
    if unknown:
        raise ConfigError(f"train.report_to: unknown tracker {unknown[0]!r}; known: {', '.join(TRACKERS.names())} "
                          f"(comma-separated), or {NONE}")
    return chosen


def check_installed(chosen: list[str]) -> None:
    """A clear error, with the pip command, for a chosen tracker whose library is missing (nothing imported)."""
    for name in chosen:
        meta = TRACKERS.get(name).meta
        if importlib.util.find_spec(meta["module"]) is None:
            raise ImportError(f"train.report_to={name} needs the {meta['pip']!r} package: "
                              f"pip install 'alignkit[tracking]' (or pip install {meta['pip']})")


def numeric(record: dict) -> dict[str, float]:
    """The record's numbers (not its step, strings or flags)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}


def start(report_to: str, run_dir: str | Path, config: dict, run_name: str) -> list:
    """The chosen trackers, started on this run (all libraries checked before any starts)."""
    chosen = names(report_to)
    check_installed(chosen)
    trackers = []
    try:
        for name in chosen:
            tracker = TRACKERS.get(name).fn()
            tracker.start(Path(run_dir), config, run_name)
            trackers.append(tracker)
    except BaseException:
        finish(trackers)
        raise
    return trackers


def log(trackers: list, record: dict) -> None:
    metrics = numeric(record)
    for tracker in trackers if metrics else ():
        tracker.log(int(record.get("step", 0)), metrics)


def finish(trackers: list) -> None:
    """Finish every tracker, even when one of them fails (the first error is raised after)."""
    errors = []
    for tracker in trackers:
        try:
            tracker.finish()
        except Exception as err:  # the others must still flush
            errors.append(err)
    if errors:
        raise errors[0]


def _flat(config: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if not isinstance(value, str) else value
    return flat


@TRACKERS.register("tensorboard", summary="TensorBoard event files in RUN_DIR/tensorboard",
                   module="tensorboard", pip="tensorboard")
class TensorBoardTracker:
    def start(self, run_dir: Path, config: dict, run_name: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.writer.add_text("config", "    " + json.dumps(config, indent=2).replace("\n", "\n    "))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def finish(self) -> None:
        self.writer.close()


@TRACKERS.register("wandb", summary="Weights & Biases, offline in RUN_DIR/wandb unless WANDB_MODE is set",
                   module="wandb", pip="wandb")
class WandbTracker:
    def start(self, run_dir: Path, config: dict, run_name: str) -> None:
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "alignkit"), name=run_name, config=config,
                              dir=os.environ.get("WANDB_DIR", str(run_dir)),
                              mode=os.environ.get("WANDB_MODE", "offline"), reinit="create_new")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def finish(self) -> None:
        self.run.finish()


@TRACKERS.register("mlflow", summary="MLflow, a SQLite store RUN_DIR/mlflow.db unless MLFLOW_TRACKING_URI is set",
                   module="mlflow", pip="mlflow")
class MlflowTracker:
    def start(self, run_dir: Path, config: dict, run_name: str) -> None:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        self.client = MlflowClient(uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "alignkit")
        experiment = self.client.get_experiment_by_name(name)
        artifacts = None if uri else (run_dir / "mlartifacts").resolve().as_uri()
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name, artifacts)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        self.client.log_dict(self.run_id, config, "config.json")
        self._params(_flat(config))

    def _params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def finish(self) -> None:
        self.client.set_terminated(self.run_id)


@TRACKERS.register("trackio", summary="trackio, in its local database (TRACKIO_DIR) unless a Space is configured",
                   module="trackio", pip="trackio")
class TrackioTracker:
    def start(self, run_dir: Path, config: dict, run_name: str) -> None:
        import trackio

        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", "alignkit"), name=run_name, config=config,
                              auto_log_cpu=False, auto_log_gpu=False)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def finish(self) -> None:
        self.run.finish()
