"""The sweep's writer: one parent run per sweep, one nested run per trial, every write retried while SQLite is busy."""

from __future__ import annotations

import contextlib
import functools
import json
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger
from mlflow.entities import LoggedModelStatus, Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from fmnist_hpo.errors import first_line
from fmnist_hpo.records import EPOCH_METRICS, EPOCH_TIMINGS, EpochMetrics, LoggedTrial
from fmnist_hpo.tags import (
    ABANDONED,
    DATA_CONTEXT,
    EXPERIMENT_KIND,
    FAILURE_REASON,
    PARENT,
    SWEEP_ID,
    UNFINISHED,
    Role,
    RunStatus,
)
from fmnist_hpo.tracking.provenance import environment_tags, model_requirements, split_fingerprint
from fmnist_hpo.tracking.reader import MAX_RUNS, last_per_step, logged_trial, read_back
from fmnist_hpo.tracking.store import (
    StoreFailure,
    TrackingError,
    check_sqlite_location,
    fluent_tracking_uri,
    is_unreachable,
    open_client,
    quiet_mlflow,
    role_filter,
    store_failure,
)

_MAX_PARAM_LENGTH = 6000
_BATCH = 100  # MLflow's limit of params (and a sane chunk of metrics) per log_batch call


def now_ms() -> int:
    return int(time.time() * 1000)


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:_MAX_PARAM_LENGTH]


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
        quiet_mlflow()
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
            raise TrackingError(f"{tracking_uri}: cannot open the MLflow store ({first_line(exc)})") from None

    def _experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                # the UI then opens on the training runs rather than the GenAI overview
                return self.client.create_experiment(name, tags={EXPERIMENT_KIND: "custom_model_development"})
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
                if attempt < self.RETRIES - 1 and _is_contention(exc) and not is_unreachable(exc):
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
        all_tags = {**environment_tags(), **tags}
        if parent_id:
            all_tags[PARENT] = parent_id
        run = self._retry(self.client.create_run, self.experiment_id, run_name=name,
                          tags={k: str(v) for k, v in all_tags.items()})
        run_id = run.info.run_id
        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for start in range(0, len(items), _BATCH):
            self._retry(self.client.log_batch, run_id, params=items[start:start + _BATCH])
        return run_id

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        stamp = now_ms()
        items = [Metric(k, float(v), stamp, step) for k, v in metrics.items()]
        for start in range(0, len(items), _BATCH):
            self._retry(self.client.log_batch, run_id, metrics=items[start:start + _BATCH])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self._retry(self.client.log_batch, run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._retry(self.client.log_text, run_id, text, artifact_file)

    def log_file(self, run_id: str, path: Path, artifact_dir: str) -> None:
        self._retry(self.client.log_artifact, run_id, str(path), artifact_dir)

    def end_run(self, run_id: str, status: RunStatus = RunStatus.FINISHED) -> None:
        self._retry(self.client.set_terminated, run_id, status=str(status))

    def reopen(self, run_id: str, tags: dict[str, str]) -> None:
        """Mark an interrupted run RUNNING again, to continue it."""
        self._retry(self.client.update_run, run_id, status=str(RunStatus.RUNNING))
        self.set_tags(run_id, tags)

    def abandon(self, parent_id: str, reason: str) -> None:
        """Close an interrupted sweep that will not be continued: nothing of it stays RUNNING."""
        for trial in self.trials_of(parent_id):
            if trial.status in UNFINISHED:
                self.set_tags(trial.run_id, {FAILURE_REASON: reason})
                self.end_run(trial.run_id, RunStatus.FAILED)
        self.set_tags(parent_id, {ABANDONED: reason})
        self.end_run(parent_id, RunStatus.FAILED)

    def trials_of(self, parent_id: str) -> list[LoggedTrial]:
        runs = self._retry(self.client.search_runs, [self.experiment_id],
                           f"tags.`{PARENT}` = '{parent_id}'", max_results=MAX_RUNS)
        return sorted(read_back(self.client, runs, ""), key=lambda t: t.number)

    def history(self, run_id: str) -> list[EpochMetrics]:
        """The per-epoch metrics of a trial run."""
        by_step: dict[int, dict[str, float]] = {}
        for key in (*EPOCH_METRICS, *EPOCH_TIMINGS):
            for step, value in last_per_step(self._retry(self.client.get_metric_history, run_id, key)).items():
                by_step.setdefault(step, {})[key] = value
        return [EpochMetrics(epoch=step, **values) for step, values in sorted(by_step.items())
                if set(EPOCH_METRICS) <= set(values)]

    def sweeps(self, sweep_id: str, statuses: tuple[RunStatus, ...]) -> list[LoggedTrial]:
        """Parent runs of this sweep in one of statuses, newest first."""
        runs = self._retry(self.client.search_runs, [self.experiment_id],
                           f"{role_filter(Role.SWEEP)} and tags.`{SWEEP_ID}` = '{sweep_id}'",
                           max_results=MAX_RUNS, order_by=["attributes.start_time DESC"])
        return [logged_trial(r, "") for r in runs if r.info.status in statuses]

    def unfinished_sweeps(self, sweep_id: str) -> list[LoggedTrial]:
        """Parent runs of this sweep left RUNNING (a crash) or KILLED (an interrupt), newest first."""
        return self.sweeps(sweep_id, UNFINISHED)

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
            with fluent_tracking_uri(self.tracking_uri):  # Model.log resolves its store through the fluent URI
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

    def log_datasets(self, run_id: str, name: str, digest: str, source: str, split_seed: int,
                     sizes: dict[str, int]) -> None:
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
            inputs.append(DatasetInput(dataset, tags=[InputTag(DATA_CONTEXT, split)]))
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
