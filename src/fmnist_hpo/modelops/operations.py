"""What `fmnist evaluate`, `predict` and `register` do: find a trained model, use it, publish it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from torch import nn

from fmnist_hpo.errors import FmnistError
from fmnist_hpo.training.checkpoints import load_model

if TYPE_CHECKING:
    pass


@dataclass
class ResolvedModel:
    model: nn.Module  # eval mode, CPU, expects normalised images
    checkpoint: Path
    run_id: str | None
    experiment: str | None = None
    trial: int | None = None


def resolve_model(target: str | None, tracking_uri: str, experiment: str | None = None) -> ResolvedModel:
    """A checkpoint path, a run id, or (target None) the best trial of experiment."""
    if target is not None and Path(target).is_file():
        return ResolvedModel(load_model(target), Path(target), None)
    from fmnist_hpo.tracking.registry import ModelStore

    store = ModelStore(tracking_uri)
    if target is None:
        if experiment is None:
            raise FmnistError("name a checkpoint or run id, or pass --experiment NAME --best")
        target = store.best_trial(experiment).run_id
    with store.local_checkpoint(target) as path:
        model = load_model(path)
    return ResolvedModel(model, path, target, *store.trial_label(target))


def test_set(data_root: str | None) -> tuple[np.ndarray, np.ndarray]:
    from fmnist_hpo.config import spec as config_module
    from fmnist_hpo.data.datasets import load_dataset

    dataset = load_dataset(config_module.validate({"data": {"root": data_root}}).data)
    return dataset.test_images, dataset.test_labels


def evaluate_and_report(resolved: ResolvedModel, data_root: str | None, png: Path, log: bool,
                        tracking_uri: str) -> tuple[object, Path]:
    from fmnist_hpo.data.datasets import CLASSES
    from fmnist_hpo.modelops.confusion import confusion_matrix_png, confusion_title
    from fmnist_hpo.modelops.inference import evaluate_model

    images, labels = test_set(data_root)
    evaluation = evaluate_model(resolved.model, images, labels)
    title = confusion_title(evaluation.accuracy, resolved.experiment, resolved.trial, fallback=resolved.checkpoint.stem)
    confusion_matrix_png(evaluation.confusion, CLASSES, png, title)
    if log:
        if resolved.run_id is None:
            raise FmnistError("--log needs a run id (a bare checkpoint file belongs to no run)")
        from fmnist_hpo.tracking.registry import ModelStore

        ModelStore(tracking_uri).attach(resolved.run_id, evaluation.as_metrics(), [png])
    return evaluation, png


def register_best(tracking_uri: str, experiment: str, name: str, run_id: str | None = None) -> dict[str, str]:
    """Register run_id, or the experiment's best trial, with the alias `champion`.

    A run already registered under name keeps its version (the "registered" key says "existing").
    """
    from fmnist_hpo.tracking.registry import ModelStore, log_trial_model
    from fmnist_hpo.tracking.writer import Tracker

    store = ModelStore(tracking_uri)

    def model_uri_of(trial: object) -> str:
        with store.local_checkpoint(trial.run_id) as checkpoint:
            return log_trial_model(Tracker(tracking_uri, experiment), trial.run_id, checkpoint)

    return store.register(experiment, name, model_uri_of, run_id)
