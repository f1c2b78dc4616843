"""What `fmnist evaluate`, `predict` and `register` do: find a trained model, use it, publish it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from torch import nn

from fmnist_hpo.config.sections import validate
from fmnist_hpo.data.datasets import DatasetInfo, dataset_named
from fmnist_hpo.errors import FmnistError
from fmnist_hpo.training.checkpoints import load_trained

if TYPE_CHECKING:
    from fmnist_hpo.modelops.inference import Evaluation


@dataclass
class ResolvedModel:
    model: nn.Module  # eval mode, CPU, expects normalised images
    dataset: DatasetInfo  # the one it was trained on
    checkpoint: Path
    run_id: str | None
    experiment: str | None = None
    trial: int | None = None


def resolve_model(target: str | None, tracking_uri: str, experiment: str | None = None) -> ResolvedModel:
    """A checkpoint path, a run id, or (target None) the best trial of experiment."""
    if target is not None and Path(target).is_file():
        return ResolvedModel(*load_trained(target), Path(target), None)
    from fmnist_hpo.tracking.registry import ModelStore

    store = ModelStore(tracking_uri)
    if target is None:
        if experiment is None:
            raise FmnistError("name a checkpoint or run id, or pass --experiment NAME --best")
        target = store.best_trial(experiment).run_id
    with store.local_checkpoint(target) as path:
        model, info = load_trained(path)
    return ResolvedModel(model, info, path, target, *store.trial_label(target))


def dataset_for(resolved: ResolvedModel, asked: str | None) -> DatasetInfo:
    """The dataset to use resolved's model on: the one it was trained on, which asked (a name) may only repeat."""
    if asked is None or asked == resolved.dataset.name:
        return resolved.dataset
    wanted = dataset_named(asked)
    trained = resolved.dataset
    raise FmnistError(f"{resolved.run_id or resolved.checkpoint}: the checkpoint was trained on {trained.title}, "
                      f"not {wanted.title}; leave --dataset out or pass --dataset {trained.name}")


def test_set(data_root: str | None, info: DatasetInfo) -> tuple[np.ndarray, np.ndarray]:
    from fmnist_hpo.data.loading import load_dataset

    dataset = load_dataset(validate({"data": {"root": data_root, "dataset": info.name}}).data)
    return dataset.test_images, dataset.test_labels


def evaluate_and_report(resolved: ResolvedModel, data_root: str | None, png: Path, log: bool,
                        tracking_uri: str, dataset: str | None = None) -> tuple[Evaluation, Path]:
    """Score resolved's model on the test set of its dataset (which dataset, if given, must name), draw the
    confusion matrix to png and, with log, attach both to its run."""
    from fmnist_hpo.modelops.confusion import confusion_matrix_png, confusion_title
    from fmnist_hpo.modelops.inference import evaluate_model

    info = dataset_for(resolved, dataset)
    images, labels = test_set(data_root, info)
    evaluation = evaluate_model(resolved.model, images, labels, info)
    title = confusion_title(evaluation.accuracy, resolved.experiment, resolved.trial, fallback=resolved.checkpoint.stem)
    confusion_matrix_png(evaluation.confusion, info.classes, png, title)
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
