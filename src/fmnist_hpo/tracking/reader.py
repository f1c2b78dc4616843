"""Reading sweeps back: runs as plain LoggedTrials, metric histories, lineage, checkpoints, logged models.

Nothing here writes to the store: it is opened without the creation lock (store.open_reader), and
checkpoint artifacts and logged models are read into temporary folders outside it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.artifacts
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fmnist_hpo.errors import first_line
from fmnist_hpo.records import TRIAL_SECONDS, LoggedTrial
from fmnist_hpo.tags import DATA_CONTEXT, POINT, REPEAT, SAMPLED, TRIAL, Role
from fmnist_hpo.tracking.store import (
    TrackingError,
    fluent_tracking_uri,
    open_reader,
    quiet_mlflow,
    role_filter,
)

MAX_RUNS = 50_000  # of one search: more than any sweep holds


def last_per_step(history: Iterable[Any]) -> dict[int, float]:
    """A metric's values by step, from MLflow's metric history; where a step was logged twice (a resumed
    epoch logs it again) the last logged counts."""
    return {m.step: m.value for m in sorted(history, key=lambda m: (m.step, m.timestamp))}


@dataclass(frozen=True)
class DatasetInput:
    context: str  # train, validation, test
    digest: str
    profile: dict[str, Any]


@dataclass(frozen=True)
class LoggedModelInfo:
    model_id: str
    experiment_id: str
    source_run_id: str | None
    status: str  # a ModelStatus


def dataset_inputs(run: Any) -> list[DatasetInput]:
    """The datasets a run lists among its inputs, one per split (writer.Tracker.log_datasets)."""
    found = []
    for item in getattr(getattr(run, "inputs", None), "dataset_inputs", None) or []:
        context = next((t.value for t in item.tags if t.key == DATA_CONTEXT), "")
        try:
            profile = json.loads(item.dataset.profile or "{}")
        except ValueError:
            profile = {}
        found.append(DatasetInput(context, item.dataset.digest, profile if isinstance(profile, dict) else {}))
    return found


def logged_trial(run: Any, experiment: str) -> LoggedTrial:
    tags = run.data.tags
    number = int(tags.get(TRIAL, -1))
    digests = (item.profile.get("files_digest") for item in dataset_inputs(run))
    return LoggedTrial(
        run_id=run.info.run_id, experiment=experiment, number=number, point=int(tags.get(POINT, number)),
        repeat=int(tags.get(REPEAT, 0)), status=run.info.status,
        values=yaml.safe_load(tags.get(SAMPLED, "{}")) or {},
        metrics=dict(run.data.metrics), params=dict(run.data.params), tags=dict(tags),
        data_digest=next((str(d) for d in digests if d), None),
    )


def read_back(client: MlflowClient, runs: list[Any], experiment: str) -> list[LoggedTrial]:
    """Trial runs as LoggedTrials; a run from before trial_seconds gets it from its epochs' history."""
    trials = [logged_trial(r, experiment) for r in runs]
    for trial in trials:
        if trial.is_legacy_record and TRIAL_SECONDS not in trial.metrics:
            # its `train_seconds` holds the last epoch's time (MLflow's latest), not the total logged at step 0
            trial.metrics[TRIAL_SECONDS] = sum(last_per_step(client.get_metric_history(trial.run_id,
                                                                                       "epoch_seconds")).values())
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


def experiment_to_show(tracking_uri: str, name: str | None) -> str | None:
    """The id of experiment `name`, else of the most recent sweep's experiment; None in a store without sweeps."""
    quiet_mlflow()
    try:
        client = open_reader(tracking_uri)
        if name is not None:
            found = client.get_experiment_by_name(name)
            if found is None:
                known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
                raise TrackingError(f"unknown experiment {name!r}; known experiments: {known}")
            return found.experiment_id
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
        latest = client.search_runs(experiment_ids, role_filter(Role.SWEEP), max_results=1,
                                    order_by=["attributes.start_time DESC"]) if experiment_ids else []
    except TrackingError:
        raise
    except Exception as exc:  # MLflow, SQLAlchemy and OS errors of a store that cannot be read
        raise TrackingError(f"{tracking_uri}: cannot read the MLflow store ({first_line(exc)})") from None
    return latest[0].info.experiment_id if latest else None


class RunReader:
    """Reads fmnist sweeps from any tracking URI through MLflow's client API."""

    def __init__(self, tracking_uri: str) -> None:
        quiet_mlflow()
        self.client = open_reader(tracking_uri)
        self.tracking_uri = tracking_uri
        self._experiment_ids: dict[str, str] = {}  # a command reads one experiment many times

    def experiments(self) -> list[str]:
        """Names of the experiments that hold at least one fmnist trial, sorted."""
        return sorted(e.name for e in self.client.search_experiments()
                      if self.client.search_runs([e.experiment_id], role_filter(Role.TRIAL), max_results=1))

    def experiment_id(self, name: str) -> str:
        if name not in self._experiment_ids:
            found = self.client.get_experiment_by_name(name)
            if found is None:
                known = ", ".join(self.experiments()) or "none"
                raise TrackingError(f"unknown experiment {name!r}; known experiments: {known}")
            self._experiment_ids[name] = found.experiment_id
        return self._experiment_ids[name]

    def trials(self, experiment: str) -> list[LoggedTrial]:
        runs = self.client.search_runs([self.experiment_id(experiment)], role_filter(Role.TRIAL), max_results=MAX_RUNS)
        return sorted(read_back(self.client, runs, experiment), key=lambda t: (t.number, t.run_id))

    def sweeps(self, experiment: str) -> list[LoggedTrial]:
        """The experiment's sweeps (their parent runs), newest first."""
        runs = self.client.search_runs([self.experiment_id(experiment)], role_filter(Role.SWEEP),
                                       max_results=MAX_RUNS, order_by=["attributes.start_time DESC"])
        return [logged_trial(r, experiment) for r in runs]

    def history(self, run_id: str, key: str) -> dict[int, float]:
        """A metric's values by step, in step order (last_per_step)."""
        return last_per_step(self.client.get_metric_history(run_id, key))

    def sweep_description(self, experiment: str) -> str:
        """The description param of the experiment's newest sweep; "" where there is none."""
        found = self.client.get_experiment_by_name(experiment)
        newest = self.client.search_runs([found.experiment_id], role_filter(Role.SWEEP), max_results=1,
                                         order_by=["attributes.start_time DESC"]) if found is not None else []
        return newest[0].data.params.get("description", "") if newest else ""


class StoreView(RunReader):
    """Everything `fmnist verify` reads of a store: besides sweeps and histories, lineage and logged models."""

    def experiment_name(self, experiment_id: str) -> str:
        return self.client.get_experiment(experiment_id).name

    def datasets(self, run_id: str) -> list[DatasetInput]:
        return dataset_inputs(self.client.get_run(run_id))

    def model_outputs(self, run_id: str) -> list[str]:
        """Ids of the LoggedModels the run lists among its outputs."""
        outputs = self.client.get_run(run_id).outputs
        return [o.model_id for o in (outputs.model_outputs if outputs else [])]

    def logged_models(self) -> list[LoggedModelInfo]:
        """Every LoggedModel of the store's active experiments."""
        ids = [e.experiment_id for e in self.client.search_experiments()]
        found: list[LoggedModelInfo] = []
        token = None
        while ids:
            page = self.client.search_logged_models(ids, max_results=100, page_token=token)
            found += [LoggedModelInfo(m.model_id, m.experiment_id, m.source_run_id, str(m.status)) for m in page]
            token = page.token
            if not token:
                break
        return found

    def logged_model(self, model_id: str) -> LoggedModelInfo | None:
        try:
            m = self.client.get_logged_model(model_id)
        except MlflowException:
            return None
        return LoggedModelInfo(m.model_id, m.experiment_id, m.source_run_id, str(m.status))

    def load_logged_model(self, model_uri: str) -> Any:
        import mlflow.pytorch

        with (fluent_tracking_uri(self.tracking_uri), no_progress_bars(),
              tempfile.TemporaryDirectory(prefix="fmnist-verify-") as folder):
            return mlflow.pytorch.load_model(model_uri, dst_path=folder)

    @contextlib.contextmanager
    def checkpoint_artifact(self, run_id: str) -> Iterator[Path | None]:
        """The run's checkpoint artifact in a temporary folder for the block, or None if it has none."""
        with tempfile.TemporaryDirectory(prefix="fmnist-verify-") as folder:
            yield download_checkpoint(self.tracking_uri, run_id, Path(folder))
