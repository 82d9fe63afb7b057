"""Experiment trackers (`train.report_to`): every metric the run writes to metrics.jsonl, sent on.

Each tracker is a class registered in `TRACKERS` with `start(run_dir, config, run_name, first_step, saved)`,
`log(step, metrics)` and `finish()`; its library is imported in `start`, only when chosen. All of them
keep to the run directory by default: TensorBoard event files, wandb offline, a local mlflow SQLite store and
trackio's local database (each overridable with the library's own environment variables).

A resumed run continues the tracker runs its first session started: `start` returns what reopens its run
(the wandb id, the mlflow run id...), kept in RUN_DIR/trackers.json and handed back as `saved` on resume,
and `first_step` is the first step the resumed run logs again (the checkpoint's step + 1; 0 when it starts
over). Steps after the checkpoint that the killed session had logged are logged again: TensorBoard drops
the old ones (purge_step); mlflow and trackio cannot, so they keep the values they hold and take the rest;
wandb ignores steps below those it holds (online).
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
STATE_FILE = "trackers.json"   # what reopens each tracker's run when the run resumes


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


def start(report_to: str, run_dir: str | Path, config: dict, run_name: str, first_step: int = 0) -> list:
    """The chosen trackers, started on this run or continuing it from `first_step` (all libraries checked
    before any starts)."""
    chosen = names(report_to)
    check_installed(chosen)
    path = Path(run_dir) / STATE_FILE
    saved = json.loads(path.read_text()) if path.exists() else {}
    trackers = []
    try:
        for name in chosen:
            tracker = TRACKERS.get(name).fn()
            saved[name] = tracker.start(Path(run_dir), config, run_name, first_step, saved.get(name))
            trackers.append(tracker)
            path.write_text(json.dumps(saved, indent=2) + "\n")
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


def _unheld(held: dict[str, int], step: int, metrics: dict[str, float]) -> dict[str, float]:
    """The metrics a continued tracker run does not hold yet at `step` (`held`: the last step of each)."""
    return {k: v for k, v in metrics.items() if step > held.get(k, -1)}


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
    def start(self, run_dir: Path, config: dict, run_name: str, first_step: int, saved: dict | None) -> dict:
        from torch.utils.tensorboard import SummaryWriter

        # TensorBoard's reader drops the events of earlier files from purge_step on.
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=first_step)
        if not first_step:
            self.writer.add_text("config", "    " + json.dumps(config, indent=2).replace("\n", "\n    "))
        return {}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def finish(self) -> None:
        self.writer.close()


@TRACKERS.register("wandb", summary="Weights & Biases, offline in RUN_DIR/wandb unless WANDB_MODE is set",
                   module="wandb", pip="wandb")
class WandbTracker:
    def start(self, run_dir: Path, config: dict, run_name: str, first_step: int, saved: dict | None) -> dict:
        import wandb

        saved = saved or {"project": os.environ.get("WANDB_PROJECT", "alignkit")}
        self.run = wandb.init(project=saved["project"], id=saved.get("id"), resume="allow" if "id" in saved else None,
                              name=run_name, config=config, dir=os.environ.get("WANDB_DIR", str(run_dir)),
                              mode=os.environ.get("WANDB_MODE", "offline"), reinit="create_new")
        return {"project": saved["project"], "id": self.run.id}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def finish(self) -> None:
        self.run.finish()


@TRACKERS.register("mlflow", summary="MLflow, a SQLite store RUN_DIR/mlflow.db unless MLFLOW_TRACKING_URI is set",
                   module="mlflow", pip="mlflow")
class MlflowTracker:
    def start(self, run_dir: Path, config: dict, run_name: str, first_step: int, saved: dict | None) -> dict:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        self.client = MlflowClient(uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
        self.run_id, self.held = self._reopen(saved["run_id"]) if saved else (None, {})
        if self.run_id is None:  # a new run, or the saved one is not in this store
            self.run_id = self._create(run_dir, run_name, uri)
            self.client.log_dict(self.run_id, config, "config.json")
            self._params(_flat(config))
        return {"run_id": self.run_id}

    def _reopen(self, run_id: str) -> tuple[str | None, dict[str, int]]:
        """The saved run, running again, and the last step of each metric it holds; (None, {}) if it is gone."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return None, {}
        self.client.update_run(run_id, status="RUNNING")
        return run_id, {key: max(m.step for m in self.client.get_metric_history(run_id, key))
                        for key in run.data.metrics}

    def _create(self, run_dir: Path, run_name: str, uri: str | None) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "alignkit")
        experiment = self.client.get_experiment_by_name(name)
        artifacts = None if uri else (run_dir / "mlartifacts").resolve().as_uri()
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name, artifacts)
        return self.client.create_run(experiment_id, run_name=run_name).info.run_id

    def _params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        fresh = _unheld(self.held, step, metrics)
        if fresh:
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in fresh.items()])

    def finish(self) -> None:
        self.client.set_terminated(self.run_id)


@TRACKERS.register("trackio", summary="trackio, in its local database (TRACKIO_DIR) unless a Space is configured",
                   module="trackio", pip="trackio")
class TrackioTracker:
    def start(self, run_dir: Path, config: dict, run_name: str, first_step: int, saved: dict | None) -> dict:
        import trackio

        project = saved["project"] if saved else os.environ.get("TRACKIO_PROJECT", "alignkit")
        self.run = trackio.init(project=project, name=run_name, config=config, resume="allow" if saved else "never",
                                auto_log_cpu=False, auto_log_gpu=False)
        self.held: dict[str, int] = {}
        for row in trackio.SQLiteStorage.get_logs(project, run_name, run_id=self.run.id) if saved else ():
            for key in row.keys() - {"step", "timestamp"}:
                self.held[key] = max(self.held.get(key, -1), row["step"])
        return {"project": project}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        fresh = _unheld(self.held, step, metrics)
        if fresh:
            self.run.log(fresh, step=step)

    def finish(self) -> None:
        self.run.finish()
