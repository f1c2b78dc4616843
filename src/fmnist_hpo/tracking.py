"""MLflow: the only module that imports it. One parent run per sweep, one nested run per trial."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fmnist_hpo.errors import FmnistError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PARENT_TAG = "mlflow.parentRunId"
_MAX_PARAM_LENGTH = 6000
_BATCH = 100  # MLflow's limit of params (and a sane chunk of metrics) per log_batch call


class TrackingError(FmnistError):
    """The tracking store cannot be opened or written."""


def resolve_tracking_uri(configured: str | None) -> str:
    """The URI to use, with a relative SQLite path made absolute (MLflow caches stores by URI text)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).expanduser().absolute()}"
    return uri


def _quiet_mlflow() -> None:
    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)


def check_sqlite_location(uri: str) -> None:
    """A one-line error now, rather than a SQLAlchemy traceback later, for an unwritable store."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///")).expanduser()
    folder = path.parent if str(path.parent) else Path(".")
    if path.exists() and not os.access(path, os.W_OK):
        raise TrackingError(f"{path}: the MLflow store is not writable")
    if not path.exists() and not (folder.is_dir() and os.access(folder, os.W_OK)):
        raise TrackingError(f"{folder}: cannot create the MLflow store {path.name} here (missing or not writable)")


@contextlib.contextmanager
def _fluent_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at uri for a moment; set_tracking_uri also writes
    MLFLOW_TRACKING_URI into the environment, which must not leak into later runs."""
    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    saved_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_uri)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _now_ms() -> int:
    return int(time.time() * 1000)


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:_MAX_PARAM_LENGTH]


class Tracker:
    """Writes a sweep into one MLflow experiment through the client API."""

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        _quiet_mlflow()
        check_sqlite_location(tracking_uri)
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        try:
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            if found is not None and found.lifecycle_stage == "deleted":
                self.client.restore_experiment(found.experiment_id)
        except MlflowException as exc:
            raise TrackingError(f"{tracking_uri}: cannot open experiment {experiment!r} ({exc.message})") from None

    # --- runs -----------------------------------------------------------------------------

    def start_run(self, name: str, params: dict[str, Any], tags: dict[str, str], parent_id: str | None = None) -> str:
        all_tags = {**self.environment_tags(), **tags}
        if parent_id:
            all_tags[PARENT_TAG] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        run_id = run.info.run_id
        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for start in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, params=items[start:start + _BATCH])
        return run_id

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        stamp = _now_ms()
        items = [Metric(k, float(v), stamp, step) for k, v in metrics.items()]
        for start in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, metrics=items[start:start + _BATCH])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_file(self, run_id: str, path: Path, artifact_dir: str) -> None:
        self.client.log_artifact(run_id, str(path), artifact_dir)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def log_pytorch_model(self, run_id: str, model: Any, input_example: Any) -> str:
        """Log model as an MLflow model linked to run_id; returns its models:/ URI."""
        import mlflow.pytorch

        with _fluent_tracking_uri(self.tracking_uri), mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(model, name="model", input_example=input_example)
        return info.model_uri

    @staticmethod
    def environment_tags() -> dict[str, str]:
        import torch

        tags = {"torch_version": torch.__version__, "python_version": platform.python_version(),
                "host": platform.node()}
        commit = git_commit()
        if commit:
            tags["git_commit"] = commit
        return tags


# --- reading runs back (for `fmnist analyze`) ---------------------------------------------------


@dataclass
class LoggedTrial:
    """One trial run as analyze sees it: plain values, no MLflow types."""

    run_id: str
    experiment: str
    number: int
    repeat: int
    status: str  # FINISHED, FAILED, KILLED, RUNNING
    values: dict[str, Any]  # the sampled values of this trial
    metrics: dict[str, float]
    params: dict[str, str]
    tags: dict[str, str]


class RunReader:
    """Reads fmnist sweeps from any tracking URI through MLflow's client API."""

    def __init__(self, tracking_uri: str) -> None:
        _quiet_mlflow()
        if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
            raise TrackingError(f"{tracking_uri}: no MLflow store here yet (run `fmnist run` first)")
        self.client = MlflowClient(tracking_uri)

    def experiments(self) -> list[str]:
        """Names of the experiments that hold at least one fmnist trial, sorted."""
        names = []
        for exp in self.client.search_experiments():
            if self.client.search_runs([exp.experiment_id], "tags.`fmnist.role` = 'trial'", max_results=1):
                names.append(exp.name)
        return sorted(names)

    def trials(self, experiment: str) -> list[LoggedTrial]:
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            known = ", ".join(self.experiments()) or "none"
            raise TrackingError(f"unknown experiment {experiment!r}; known experiments: {known}")
        runs = self.client.search_runs([found.experiment_id], "tags.`fmnist.role` = 'trial'", max_results=50_000)
        trials = [
            LoggedTrial(
                run_id=r.info.run_id, experiment=experiment, number=int(r.data.tags.get("trial", -1)),
                repeat=int(r.data.tags.get("repeat", 0)), status=r.info.status,
                values=yaml.safe_load(r.data.tags.get("sampled", "{}")) or {},
                metrics=dict(r.data.metrics), params=dict(r.data.params), tags=dict(r.data.tags),
            )
            for r in runs
        ]
        return sorted(trials, key=lambda t: (t.number, t.run_id))

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in self.client.get_metric_history(run_id, key))

    def sweep_description(self, experiment: str) -> str:
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            return ""
        runs = self.client.search_runs([found.experiment_id], "tags.`fmnist.role` = 'sweep'", max_results=1,
                                       order_by=["attributes.start_time DESC"])
        return runs[0].data.params.get("description", "") if runs else ""
