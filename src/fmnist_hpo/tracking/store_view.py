"""A read-only view of an MLflow store, for `fmnist verify`: plain values out, nothing written.

It opens the store with MLflow's own client and no creation lock (tracking.open_client takes one,
which writes a lock file beside the store), and never calls a method that logs, tags or ends a run.
Checkpoint artifacts and logged models are read into temporary folders outside the store.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fmnist_hpo.records import LoggedTrial
from fmnist_hpo.tracking.tracker import (
    TrackingError,
    _fluent_tracking_uri,
    _quiet_mlflow,
    download_checkpoint,
    logged_trial,
    no_progress_bars,
    read_back,
)


@dataclass(frozen=True)
class LoggedModelInfo:
    model_id: str
    experiment_id: str
    source_run_id: str | None
    status: str  # READY, PENDING, FAILED


@dataclass(frozen=True)
class DatasetInput:
    context: str  # train, validation, test
    digest: str
    profile: dict[str, Any]


class StoreView:
    """Reads sweeps, histories, lineage, checkpoints and logged models of one store."""

    def __init__(self, tracking_uri: str) -> None:
        _quiet_mlflow()
        if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
            raise TrackingError(f"{tracking_uri}: no MLflow store here")
        self.tracking_uri = tracking_uri
        try:
            self.client = MlflowClient(tracking_uri)
            self._experiments = {e.name: e.experiment_id for e in self.client.search_experiments()}
        except Exception as exc:  # MLflow, SQLAlchemy and OS errors of a store that cannot be read
            raise TrackingError(f"{tracking_uri}: cannot read the MLflow store ({str(exc).splitlines()[0][:200]})") from None
        self._names = {i: name for name, i in self._experiments.items()}

    def experiments(self) -> list[str]:
        """Names of the experiments holding at least one fmnist trial, sorted."""
        return sorted(name for name, i in self._experiments.items()
                      if self.client.search_runs([i], "tags.`fmnist.role` = 'trial'", max_results=1))

    def experiment_id(self, name: str) -> str:
        if name not in self._experiments:
            known = ", ".join(self.experiments()) or "none"
            raise TrackingError(f"unknown experiment {name!r}; known experiments: {known}")
        return self._experiments[name]

    def experiment_name(self, experiment_id: str) -> str:
        return self._names.get(experiment_id) or self.client.get_experiment(experiment_id).name

    def runs(self, experiment: str, role: str) -> list[LoggedTrial]:
        """The experiment's sweeps (role 'sweep') or trials (role 'trial'), as stored."""
        runs = self.client.search_runs([self.experiment_id(experiment)], f"tags.`fmnist.role` = '{role}'",
                                       run_view_type=ViewType.ACTIVE_ONLY, max_results=50_000)
        if role == "trial":
            return sorted(read_back(self.client, runs, experiment), key=lambda t: (t.number, t.run_id))
        return [logged_trial(r, experiment) for r in runs]

    def history(self, run_id: str, key: str) -> dict[int, float]:
        """A metric's values by step, the last logged where a step was logged twice (a resumed epoch)."""
        values = sorted(self.client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        return {m.step: m.value for m in values}

    def datasets(self, run_id: str) -> list[DatasetInput]:
        import json

        inputs = self.client.get_run(run_id).inputs
        found = []
        for item in (inputs.dataset_inputs if inputs else []):
            context = next((t.value for t in item.tags if t.key == "mlflow.data.context"), "")
            try:
                profile = json.loads(item.dataset.profile or "{}")
            except ValueError:
                profile = {}
            found.append(DatasetInput(context, item.dataset.digest, profile))
        return found

    def model_outputs(self, run_id: str) -> list[str]:
        """Ids of the LoggedModels the run lists among its outputs."""
        outputs = self.client.get_run(run_id).outputs
        return [o.model_id for o in (outputs.model_outputs if outputs else [])]

    def logged_models(self) -> list[LoggedModelInfo]:
        """Every LoggedModel of the store's active experiments."""
        ids = list(self._experiments.values())
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

        with (_fluent_tracking_uri(self.tracking_uri), no_progress_bars(),
              tempfile.TemporaryDirectory(prefix="fmnist-verify-") as folder):
            return mlflow.pytorch.load_model(model_uri, dst_path=folder)

    @contextlib.contextmanager
    def checkpoint_artifact(self, run_id: str) -> Iterator[Path | None]:
        """The run's checkpoint artifact in a temporary folder for the block, or None if it has none."""
        with tempfile.TemporaryDirectory(prefix="fmnist-verify-") as folder:
            yield download_checkpoint(self.tracking_uri, run_id, Path(folder))
