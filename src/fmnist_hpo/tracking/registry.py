"""Trained models of logged trials: the best one, its checkpoint, its evaluations and its registry entries."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from fmnist_hpo.files import checkpoint_file, models_folder
from fmnist_hpo.records import LoggedTrial
from fmnist_hpo.selection import select
from fmnist_hpo.tags import MODEL_URI, TRIAL
from fmnist_hpo.tracking.reader import RunReader, download_checkpoint, logged_trial
from fmnist_hpo.tracking.store import TrackingError, fluent_tracking_uri
from fmnist_hpo.tracking.writer import Tracker, now_ms


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
        trial = run.data.tags.get(TRIAL, "")
        return self.client.get_experiment(run.info.experiment_id).name, int(trial) if trial.isdigit() else None

    def checkpoint(self, run_id: str) -> Path:
        """The run's checkpoint: the local file under models/ if it is there, else downloaded."""
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            raise TrackingError(f"{run_id!r} is neither a checkpoint file nor a run in {self.client.tracking_uri}") from None
        experiment = self.client.get_experiment(run.info.experiment_id).name
        local = checkpoint_file(models_folder(run.data.params.get("models_dir", "models"), experiment), run_id)
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
        stamp = now_ms()
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
            model_uri = best.tags.get(MODEL_URI) or model_uri_of(best)
            tags = {"experiment": experiment, "run_id": best.run_id, "trial": best.number, **{
                key: f"{best.metrics[key]:.6f}" for key in ("kept_val_accuracy", "kept_val_loss", "test_accuracy",
                                                            "test_loss") if key in best.metrics}}
            with fluent_tracking_uri(self.client.tracking_uri):  # models:/ URIs resolve through the fluent URI
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
    tracker.set_tags(run_id, {MODEL_URI: uri})
    return uri
