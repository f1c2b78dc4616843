"""MLflow: the only module that imports it. One parent run per sweep, one nested run per trial."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import mlflow.artifacts
import numpy as np
import yaml
from loguru import logger
from mlflow.entities import LoggedModelStatus, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fmnist_hpo.errors import FmnistError, MachineFailure
from fmnist_hpo.faults import machine_failure
from fmnist_hpo.records import EPOCH_METRICS, EPOCH_TIMINGS, TRIAL_SECONDS, EpochMetrics, LoggedTrial
from fmnist_hpo.selection import select
from fmnist_hpo.tracking import sqlite_store

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PARENT_TAG = "mlflow.parentRunId"
_MAX_PARAM_LENGTH = 6000
_BATCH = 100  # MLflow's limit of params (and a sane chunk of metrics) per log_batch call


class TrackingError(FmnistError):
    """The tracking store cannot be opened or written."""


class StoreFailure(TrackingError, MachineFailure):
    """The store stopped taking writes mid-sweep (disk full, read-only, removed, locked past the wait, a server
    gone): an interruption of the sweep, to resume once fixed, never a failed trial."""


# SQLite's words for a store that stopped taking writes -> (what happened, what the user does about it)
_STORE_FAULTS = {
    "database or disk is full": ("no space left on device for the MLflow store {store}", "free space"),
    "readonly database": ("the MLflow store {store} is read-only", "make it writable"),
    "unable to open database file": ("cannot open the MLflow store {store} (removed, or its folder not writable)",
                                     "restore it"),
    "no such table": ("the MLflow store {store} was removed or replaced during the sweep", "restore it"),
    "disk i/o error": ("disk I/O error on the MLflow store {store}", "check the disk"),
    "database disk image is malformed": ("the MLflow store {store} is corrupt", "restore it from a backup"),
    "file is not a database": ("the MLflow store {store} is corrupt", "restore it from a backup"),
    "database is locked": ("the MLflow store {store} stayed locked by another process", "let that process finish"),
}


def store_failure(tracking_uri: str, exc: BaseException) -> MachineFailure | None:
    """The machine's failure behind an exception of a store write, or None (then it is a bug, not the machine)."""
    if _is_unreachable(exc):
        return StoreFailure(f"the tracking server {tracking_uri} does not answer", "start it again")
    text = str(exc).lower()
    store = tracking_uri.removeprefix("sqlite:///")
    if tracking_uri.startswith("sqlite:///") and "database" in text and not Path(store).exists():
        return StoreFailure(f"the MLflow store {store} was removed during the sweep", "restore it")  # SQLite: 'readonly'
    for words, (cause, fix) in _STORE_FAULTS.items():
        if words in text:
            return StoreFailure(cause.format(store=store), fix)
    return machine_failure(exc)


def resolve_tracking_uri(configured: str | None) -> str:
    """The URI to use, with a relative SQLite path made absolute (MLflow caches stores by URI text)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).expanduser().absolute()}"
    return uri


def _quiet_mlflow() -> None:
    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # it logs every SQLite error with its traceback before raising it; we retry, wait or report it in one line
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


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
    MLFLOW_TRACKING_URI into the environment, which must not leak into later runs.

    An unset URI is restored as unset (None): get_tracking_uri() would return the default made
    absolute for the current folder, and pinning that would send later calls from another folder
    to this folder's store.
    """
    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    saved_uri = mlflow.get_tracking_uri() if mlflow.tracking.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_uri)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def open_client(tracking_uri: str) -> MlflowClient:
    """A client whose store exists, for writing. A new SQLite store is built by one process at a time, in a
    temporary file linked into place when complete (sqlite_store.py), so that neither a kill -9 nor another
    MLflow client building the same file at once can leave a half-built schema behind."""
    if not tracking_uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri)
    from filelock import FileLock

    db = Path(tracking_uri.removeprefix("sqlite:///"))
    head = _schema_head()
    with FileLock(str(db.parent / f".{db.name}.lock"), timeout=120):
        state, runs = _settled(db, head)
        new = state in (sqlite_store.State.MISSING, sqlite_store.State.EMPTY)
        if new and not sqlite_store.build_beside(db, _build_store, replace=state is sqlite_store.State.EMPTY):
            state, runs = _settled(db, head)  # another MLflow client put its own there meanwhile
        _refuse(db, state, runs)
        client = MlflowClient(tracking_uri)
        client.search_experiments(max_results=1)
    return client


def open_reader(tracking_uri: str) -> MlflowClient:
    """A client of an existing store, for reading: no lock file, no creation, no write access needed."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        if not db.is_file():
            raise TrackingError(f"{tracking_uri}: no MLflow store here yet (run `fmnist run` first)")
        _refuse(db, *_inspected(db, _schema_head()), reading=True)
    try:
        client = MlflowClient(tracking_uri)
        client.search_experiments(max_results=1)
    except Exception as exc:  # MLflow, SQLAlchemy and OS errors of a store that cannot be read
        raise TrackingError(f"{tracking_uri}: cannot read the MLflow store ({_first_line(exc)})") from None
    return _ReadingClient(client)


class _ReadingClient:
    """An MlflowClient whose failures (a store locked past SQLite's wait, or broken) are one-line TrackingErrors."""

    def __init__(self, client: MlflowClient) -> None:
        self._client = client
        self.tracking_uri = client.tracking_uri

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            except MlflowException as exc:
                failure = store_failure(self.tracking_uri, exc)
                if failure is None:
                    raise
                raise TrackingError(str(failure)) from None

        return call


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


@functools.cache  # parsing MLflow's migration scripts takes a moment
def _schema_head() -> str:
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def _build_store(uri: str) -> None:
    client = MlflowClient(uri)
    client.search_experiments(max_results=1)  # builds every table, and the default experiment
    client._tracking_client.store.engine.dispose()  # its file is about to be renamed


def _inspected(db: Path, head: str) -> tuple[sqlite_store.State, int]:
    try:
        return sqlite_store.inspect(db, head)
    except sqlite_store.StoreFileError as exc:
        raise TrackingError(str(exc)) from None


def _settled(db: Path, head: str) -> tuple[sqlite_store.State, int]:
    try:
        return sqlite_store.settle(db, head, logger.info)
    except sqlite_store.StoreFileError as exc:
        raise TrackingError(str(exc)) from None


def _refuse(db: Path, state: sqlite_store.State, runs: int, reading: bool = False) -> None:
    problem = sqlite_store.refusal(db, state, runs)
    if problem is None and reading and state is sqlite_store.State.EMPTY:
        problem = f"{db}: an empty file, not an MLflow store yet (run `fmnist run` first)"
    if problem is not None:
        raise TrackingError(problem)


def create_store(tracking_uri: str) -> None:
    """Create an empty SQLite store (MLflow's tables, no runs) so a server can start on it."""
    check_sqlite_location(tracking_uri)
    try:
        open_client(tracking_uri)
    except Exception as exc:  # SQLAlchemy and OS errors
        raise TrackingError(f"{tracking_uri}: cannot create the MLflow store ({str(exc).splitlines()[0][:200]})") from None


def experiment_to_show(tracking_uri: str, name: str | None) -> str | None:
    """The id of experiment `name`, else of the most recent sweep's experiment; None in a store without sweeps."""
    _quiet_mlflow()
    try:
        client = open_reader(tracking_uri)
        if name is not None:
            found = client.get_experiment_by_name(name)
            if found is None:
                known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
                raise TrackingError(f"unknown experiment {name!r}; known experiments: {known}")
            return found.experiment_id
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
        latest = client.search_runs(experiment_ids, "tags.`fmnist.role` = 'sweep'", max_results=1,
                                    order_by=["attributes.start_time DESC"]) if experiment_ids else []
    except TrackingError:
        raise
    except Exception as exc:  # MLflow, SQLAlchemy and OS errors of a store that cannot be read
        raise TrackingError(f"{tracking_uri}: cannot read the MLflow store ({str(exc).splitlines()[0][:200]})") from None
    return latest[0].info.experiment_id if latest else None


@functools.cache  # one process, one commit: not a subprocess per trial run
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


def model_requirements() -> list[str]:
    """What loading a logged pt2 model needs, pinned to this environment (inferring them reloads the model)."""
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
            f"numpy=={np.__version__}"]


def split_fingerprint(files_digest: str, split: str, split_seed: int, size: int) -> str:
    text = json.dumps([files_digest, split, split_seed, size])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def missing_system_metrics_packages() -> list[str]:
    """Packages MLflow's system-metrics monitor needs that are not installed here."""
    import importlib.util

    missing = [] if importlib.util.find_spec("psutil") else ["psutil"]
    if importlib.util.find_spec("pynvml") is None and _has_cuda():
        missing.append("nvidia-ml-py")
    return missing


@functools.cache
def _say_once(message: str) -> None:
    """A warning shown once per process, however many trials run into the same missing package."""
    logger.warning(message)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _is_unreachable(exc: BaseException) -> bool:
    """A tracking server that is down or went away (MLflow has already retried the request)."""
    text = str(exc)
    return any(sign in text for sign in ("Max retries exceeded", "Failed to establish a new connection",
                                         "Connection refused", "Connection aborted", "RemoteDisconnected"))


def _is_contention(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(word in text for word in ("database is locked", "database is busy", "unique constraint failed",
                                         "already exists", "deadlock"))


class Tracker:
    """Writes a sweep into one MLflow experiment through the client API.

    Every write is retried with backoff when SQLite reports contention, so two sweeps (or a sweep
    and `fmnist serve-ui`) can share one store file.
    """

    RETRIES = 12

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        _quiet_mlflow()
        check_sqlite_location(tracking_uri)
        self.tracking_uri = tracking_uri
        try:
            self.client = open_client(tracking_uri)
            self.experiment_id = self._retry(self._experiment_id, experiment)
        except TrackingError as exc:
            if not isinstance(exc, StoreFailure):
                raise  # its own one line already (a half-built, corrupt or foreign store)
            raise TrackingError(f"{tracking_uri}: cannot open the MLflow store ({exc})") from None
        except MlflowException as exc:
            raise TrackingError(f"{tracking_uri}: cannot open experiment {experiment!r} ({exc.message})") from None
        except Exception as exc:  # SQLAlchemy and OS errors on a broken store
            raise TrackingError(f"{tracking_uri}: cannot open the MLflow store ({str(exc).splitlines()[0][:200]})") from None

    def _experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                # the UI then opens on the training runs rather than the GenAI overview
                return self.client.create_experiment(name, tags={"mlflow.experimentKind": "custom_model_development"})
            except MlflowException:
                found = self.client.get_experiment_by_name(name)  # created by a concurrent sweep
                if found is None:
                    raise
        if found.lifecycle_stage == "deleted":
            self.client.restore_experiment(found.experiment_id)
        return found.experiment_id

    def _retry(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """fn's result, retried while SQLite is busy (each try already waits up to 20 s for a lock);
        a store that stops taking writes raises StoreFailure, an OSError of ours MachineFailure."""
        delay = 0.05
        for attempt in range(self.RETRIES):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if attempt < self.RETRIES - 1 and _is_contention(exc) and not _is_unreachable(exc):
                    if "locked" in str(exc).lower():
                        _say_once(f"the MLflow store {self.tracking_uri} is locked by another process; waiting for it")
                    time.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                failure = store_failure(self.tracking_uri, exc)
                if failure is None:
                    raise
                raise failure from None
        raise AssertionError("unreachable")

    # --- runs -----------------------------------------------------------------------------

    def start_run(self, name: str, params: dict[str, Any], tags: dict[str, str], parent_id: str | None = None) -> str:
        all_tags = {**self.environment_tags(), **tags}
        if parent_id:
            all_tags[PARENT_TAG] = parent_id
        run = self._retry(self.client.create_run, self.experiment_id, run_name=name, tags=all_tags)
        run_id = run.info.run_id
        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for start in range(0, len(items), _BATCH):
            self._retry(self.client.log_batch, run_id, params=items[start:start + _BATCH])
        return run_id

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        stamp = _now_ms()
        items = [Metric(k, float(v), stamp, step) for k, v in metrics.items()]
        for start in range(0, len(items), _BATCH):
            self._retry(self.client.log_batch, run_id, metrics=items[start:start + _BATCH])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self._retry(self.client.log_batch, run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._retry(self.client.log_text, run_id, text, artifact_file)

    def log_file(self, run_id: str, path: Path, artifact_dir: str) -> None:
        self._retry(self.client.log_artifact, run_id, str(path), artifact_dir)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self._retry(self.client.set_terminated, run_id, status=status)

    def reopen(self, run_id: str, tags: dict[str, str]) -> None:
        """Mark an interrupted run RUNNING again, to continue it."""
        self._retry(self.client.update_run, run_id, status="RUNNING")
        self.set_tags(run_id, tags)

    def abandon(self, parent_id: str, reason: str) -> None:
        """Close an interrupted sweep that will not be continued: nothing of it stays RUNNING."""
        for trial in self.trials_of(parent_id):
            if trial.status in ("RUNNING", "KILLED"):
                self.set_tags(trial.run_id, {"failure_reason": reason})
                self.end_run(trial.run_id, "FAILED")
        self.set_tags(parent_id, {"abandoned": reason})
        self.end_run(parent_id, "FAILED")

    def trials_of(self, parent_id: str) -> list[LoggedTrial]:
        runs = self._retry(self.client.search_runs, [self.experiment_id],
                           f"tags.`{PARENT_TAG}` = '{parent_id}'", max_results=50_000)
        return sorted(read_back(self.client, runs, ""), key=lambda t: t.number)

    def history(self, run_id: str) -> list[EpochMetrics]:
        """The per-epoch metrics of a trial run."""
        by_step: dict[int, dict[str, float]] = {}
        for key in (*EPOCH_METRICS, *EPOCH_TIMINGS):
            for m in self._retry(self.client.get_metric_history, run_id, key):
                by_step.setdefault(m.step, {})[key] = m.value
        return [EpochMetrics(epoch=step, **values) for step, values in sorted(by_step.items())
                if set(EPOCH_METRICS) <= set(values)]

    def sweeps(self, sweep_id: str, statuses: tuple[str, ...]) -> list[LoggedTrial]:
        """Parent runs of this sweep in one of statuses, newest first."""
        runs = self._retry(self.client.search_runs, [self.experiment_id],
                           f"tags.`fmnist.role` = 'sweep' and tags.sweep_id = '{sweep_id}'",
                           max_results=1000, order_by=["attributes.start_time DESC"])
        return [logged_trial(r, "") for r in runs if r.info.status in statuses]

    def unfinished_sweeps(self, sweep_id: str) -> list[LoggedTrial]:
        """Parent runs of this sweep left RUNNING (a crash) or KILLED (an interrupt), newest first."""
        return self.sweeps(sweep_id, ("RUNNING", "KILLED"))

    def log_pytorch_model(self, run_id: str, model: Any, input_example: np.ndarray, output_width: int) -> str:
        """Log model as an MLflow model (pt2, pickle-free) whose source run is run_id; returns its models:/ URI.

        The run is named, not reopened: reopening a finished run through the fluent API rewrites its
        end time and can leave it FAILED. The signature takes float32 batches shaped like
        input_example and returns float32 (batch, output_width). A run that has its model already
        (an interrupt after the model was written) keeps it.
        """
        import mlflow.pytorch
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *input_example.shape[1:]))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, output_width))]))

        run = self._retry(self.client.get_run, run_id)
        ready = self._retry(self._models_of_run, run)
        if ready:
            return f"models:/{ready[0].model_id}"

        model_id = self._retry(self._new_logged_model, run)  # once: a retried logging fills the same model

        def log() -> str:
            with _fluent_tracking_uri(self.tracking_uri):  # Model.log resolves its store through the fluent URI
                return mlflow.pytorch.log_model(
                    model, name="model", run_id=run_id, signature=signature, input_example=input_example,
                    model_id=model_id,
                    serialization_format="pt2", pip_requirements=model_requirements(),
                    # serving validation reloads the model in this process and fails on CUDA hosts (the
                    # exported weights are CPU tensors); the pt2 export has already traced the example
                    validate_serving_input=False,
                ).model_uri

        return self._retry(log)

    def _models_of_run(self, run: Any) -> list[Any]:
        """The run's READY LoggedModels, newest first; unfinished ones (an interrupt while logging) are deleted."""
        models = self.client.search_logged_models([run.info.experiment_id], f"source_run_id = '{run.info.run_id}'")
        for pending in (m for m in models if m.status != LoggedModelStatus.READY):
            logger.info(f"run {run.info.run_id}: deleting the unfinished model {pending.model_id} an interrupt left")
            self.client.delete_logged_model(pending.model_id)
        ready = [m for m in models if m.status == LoggedModelStatus.READY]
        return sorted(ready, key=lambda m: m.creation_timestamp, reverse=True)

    def _new_logged_model(self, run: Any) -> str:
        """A PENDING LoggedModel in the run's own experiment, with the run's params.

        Without a model_id, mlflow.pytorch.log_model creates it in the fluent API's experiment
        (Default), where neither the experiment's Models tab nor its runs table shows it.
        """
        return self.client.create_logged_model(run.info.experiment_id, name="model", source_run_id=run.info.run_id,
                                               params=run.data.params).model_id

    def log_datasets(self, run_id: str, digest: str, source: str, split_seed: int, sizes: dict[str, int],
                     name: str = "fashion-mnist") -> None:
        """Record the run's inputs: one dataset per split (train, validation, test) with MLflow's dataset tracking.

        digest fingerprints the IDX files; each split's own digest also covers the split seed and its
        size, since MLflow keeps one dataset per (name, digest) and another seed is another split.
        """
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import Dataset, DatasetInput, InputTag

        with warnings.catch_warnings():  # MLflow registers its local-file source twice and warns about itself
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted", UserWarning)
            dataset_source = resolve_dataset_source(source)
        inputs = []
        for split, size in sizes.items():
            split_digest = split_fingerprint(digest, split, split_seed, size)
            meta = MetaDataset(dataset_source, name=name, digest=split_digest)
            profile = {"files_digest": digest, "split": split, "split_seed": split_seed, "num_examples": size}
            dataset = Dataset(**{**meta.to_dict(), "profile": json.dumps(profile)})
            inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", split)]))
        self._retry(self.client.log_inputs, run_id, datasets=inputs)

    @contextlib.contextmanager
    def system_metrics(self, run_id: str, sampling_seconds: float = 10.0) -> Iterator[None]:
        """Log CPU, memory, disk, network (and GPU) utilisation to run_id while the block runs.

        MLflow's monitor needs psutil (and nvidia-ml-py for NVIDIA GPUs); without psutil this logs
        one line saying what to install and the block runs unmonitored.
        """
        missing = missing_system_metrics_packages()
        if missing:
            _say_once(f"system metrics {'are off' if 'psutil' in missing else 'leave out the GPU'}: "
                      f"pip install {' '.join(missing)}")
            if "psutil" in missing:
                yield
                return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=sampling_seconds, resume_logging=True,
                                       tracking_uri=self.tracking_uri)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

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


def logged_trial(run: Any, experiment: str) -> LoggedTrial:
    tags = run.data.tags
    number = int(tags.get("trial", -1))
    return LoggedTrial(
        run_id=run.info.run_id, experiment=experiment, number=number, point=int(tags.get("point", number)),
        repeat=int(tags.get("repeat", 0)), status=run.info.status,
        values=yaml.safe_load(tags.get("sampled", "{}")) or {},
        metrics=dict(run.data.metrics), params=dict(run.data.params), tags={**_data_digest(run), **tags},
    )


def read_back(client: MlflowClient, runs: list[Any], experiment: str) -> list[LoggedTrial]:
    """Trial runs as LoggedTrials; a run from before trial_seconds gets it from its epochs' history."""
    trials = [logged_trial(r, experiment) for r in runs]
    for trial in trials:
        if trial.is_legacy_record and TRIAL_SECONDS not in trial.metrics:
            # its `train_seconds` holds the last epoch's time (MLflow's latest), not the total logged at step 0
            last_per_step = {m.step: m.value for m in sorted(client.get_metric_history(trial.run_id, "epoch_seconds"),
                                                              key=lambda m: (m.step, m.timestamp))}
            trial.metrics[TRIAL_SECONDS] = sum(last_per_step.values())
    return trials


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """MLflow draws a progress bar per artifact download on stderr: not between our one-line messages."""
    saved = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = saved


def download_checkpoint(tracking_uri: str, run_id: str, folder: Path) -> Path | None:
    """The run's checkpoint artifact, downloaded into folder; None if the run has none."""
    try:
        with no_progress_bars():
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoint", dst_path=str(folder),
                                                tracking_uri=tracking_uri)
    except (MlflowException, OSError):
        return None
    return next(iter(sorted(folder.rglob("*.pt"))), None)


def _data_digest(run: Any) -> dict[str, str]:
    """{'data_digest': ...}: the IDX files' digest that log_datasets recorded with the run's inputs."""
    for item in getattr(getattr(run, "inputs", None), "dataset_inputs", None) or []:
        with contextlib.suppress(TypeError, ValueError):
            digest = json.loads(item.dataset.profile or "{}").get("files_digest")
            if digest:
                return {"data_digest": digest}
    return {}


class RunReader:
    """Reads fmnist sweeps from any tracking URI through MLflow's client API."""

    def __init__(self, tracking_uri: str) -> None:
        _quiet_mlflow()
        self.client = open_reader(tracking_uri)

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
        return sorted(read_back(self.client, runs, experiment), key=lambda t: (t.number, t.run_id))

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in self.client.get_metric_history(run_id, key))

    def sweep_description(self, experiment: str) -> str:
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            return ""
        runs = self.client.search_runs([found.experiment_id], "tags.`fmnist.role` = 'sweep'", max_results=1,
                                       order_by=["attributes.start_time DESC"])
        return runs[0].data.params.get("description", "") if runs else ""


# --- trained models: find, attach evaluations, register ------------------------------------------


def best_of(trials: list[LoggedTrial]) -> LoggedTrial | None:
    """The run standing for the configuration the sweep's own metric selects on validation (never test)."""
    if not trials:
        return None
    chosen = select(trials, trials[0].search_metric)
    return chosen.representative if chosen else None


class ModelStore(RunReader):
    """The trained models of logged trials: their checkpoints, evaluations and registry entries."""

    def __init__(self, tracking_uri: str) -> None:
        super().__init__(tracking_uri)
        self.downloads: dict[Path, Path] = {}  # a downloaded checkpoint -> its temporary folder

    def best_trial(self, experiment: str) -> LoggedTrial:
        best = best_of(self.trials(experiment))
        if best is None:
            raise TrackingError(f"experiment {experiment!r} has no finished trials")
        return best

    def trial_label(self, run_id: str) -> tuple[str, int | None]:
        """(experiment name, trial number) of a trial run, to name it where a run id would not say much."""
        run = self.client.get_run(run_id)
        trial = run.data.tags.get("trial", "")
        return self.client.get_experiment(run.info.experiment_id).name, int(trial) if trial.isdigit() else None

    def checkpoint(self, run_id: str) -> Path:
        """The run's checkpoint: the local file under models/ if it is there, else downloaded."""
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            raise TrackingError(f"{run_id!r} is neither a checkpoint file nor a run in {self.client.tracking_uri}") from None
        experiment = self.client.get_experiment(run.info.experiment_id).name
        local = Path(run.data.params.get("models_dir", "models")) / experiment / f"{run_id}.pt"
        if local.is_file():  # a damaged one is restored from the artifact copy
            from fmnist_hpo.training.repair import usable_checkpoint

            return usable_checkpoint(local, run_id, lambda folder: download_checkpoint(self.client.tracking_uri,
                                                                                     run_id, folder))
        download = Path(tempfile.mkdtemp(prefix="fmnist-"))
        found = download_checkpoint(self.client.tracking_uri, run_id, download)
        if found is None:
            shutil.rmtree(download, ignore_errors=True)
            raise TrackingError(f"run {run_id} has no checkpoint (not under models/, no artifact)")
        self.downloads[found] = download
        return found

    @contextlib.contextmanager
    def local_checkpoint(self, run_id: str) -> Iterator[Path]:
        """The run's checkpoint as a local file for the block; a downloaded copy is removed after it."""
        path = self.checkpoint(run_id)
        try:
            yield path
        finally:
            download = self.downloads.pop(path, None)
            if download is not None:
                shutil.rmtree(download, ignore_errors=True)

    def attach(self, run_id: str, metrics: dict[str, float], files: list[Path]) -> None:
        stamp = _now_ms()
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), stamp, 0) for k, v in metrics.items()
                                                if v == v])  # NaN (a class never predicted) is left out
        for path in files:
            self.client.log_artifact(run_id, str(path), "evaluation")

    def register(self, experiment: str, name: str, model_uri_of: Any, run_id: str | None = None) -> dict[str, str]:
        """Register a trial (by default the experiment's best) under `name` and move `champion` to it.

        A trial already registered under name keeps its version rather than getting an identical new
        one ("registered": "existing"). model_uri_of(trial) returns the trial's models:/ URI, logging
        the model first if it has none.
        """
        best = self.best_trial(experiment) if run_id is None else logged_trial(self.client.get_run(run_id), experiment)
        try:
            existing = self._version_of_run(name, best.run_id)
            if existing is not None:
                self.client.set_registered_model_alias(name, "champion", existing.version)
                return {"name": name, "version": str(existing.version), "run_id": best.run_id,
                        "model_uri": existing.source, "registered": "existing"}
            model_uri = best.tags.get("model_uri") or model_uri_of(best)
            tags = {"experiment": experiment, "run_id": best.run_id, "trial": best.number, **{
                key: f"{best.metrics[key]:.6f}" for key in ("kept_val_accuracy", "kept_val_loss", "test_accuracy",
                                                            "test_loss") if key in best.metrics}}
            with _fluent_tracking_uri(self.client.tracking_uri):  # models:/ URIs resolve through the fluent URI
                version = self._new_version(name, model_uri, best.run_id, tags)
        except MlflowException as exc:
            raise TrackingError(f"cannot register {name!r}: {exc.message}") from None
        return {"name": name, "version": str(version.version), "run_id": best.run_id, "model_uri": model_uri,
                "registered": "new"}

    def _version_of_run(self, name: str, run_id: str) -> Any:
        """The newest version of registered model `name` made from run_id, or None."""
        versions = [v for v in self.client.search_model_versions(f"run_id = '{run_id}'") if v.name == name]
        return max(versions, key=lambda v: int(v.version), default=None)  # a name may hold quotes: not in the filter

    def _new_version(self, name: str, model_uri: str, run_id: str, tags: dict[str, Any]) -> Any:
        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(exc):
                raise
        # a tracking server accepts a models:/m-... source only with the LoggedModel's id beside it
        model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
        version = self.client.create_model_version(name, source=model_uri, run_id=run_id, model_id=model_id)
        self.client.set_registered_model_alias(name, "champion", version.version)
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version.version, key, str(value))
        return version


def alive_elsewhere(trial_tags: dict[str, str]) -> bool:
    """Whether the process that ran a sweep is still running on this host."""
    if trial_tags.get("host") != os.uname().nodename or not trial_tags.get("pid", "").isdigit():
        return False
    pid = int(trial_tags["pid"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def log_trial_model(tracker: Tracker, run_id: str, checkpoint: Path) -> str:
    """Log a trial's checkpoint as an MLflow model (pt2, pickle-free) linked to its run; tag the run with it.

    The logged model takes float images in [0, 1] of shape (N, 1, 28, 28) (its dataset's channels and
    size) and returns a logit per class.
    """
    from fmnist_hpo.training.checkpoints import load_trained
    from fmnist_hpo.training.model import with_normalization

    model, info = load_trained(checkpoint)
    example = np.zeros((2, info.channels, *info.image_shape), dtype=np.float32)  # batch 2 keeps the batch dim dynamic
    uri = tracker.log_pytorch_model(run_id, with_normalization(model, info), example, len(info.classes))
    tracker.set_tags(run_id, {"model_uri": uri})
    return uri
