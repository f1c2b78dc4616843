"""`fmnist evaluate`, `predict` and `register`: the commands that use a trained model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fmnist_hpo.cli.options import DatasetOption, TrackingOption
from fmnist_hpo.errors import FmnistError


def evaluate(
    target: Annotated[str | None, typer.Argument(help="a run id or a checkpoint file")] = None,
    experiment: Annotated[str | None, typer.Option(help="evaluate this experiment's best trial (implies --best)")] = None,
    best: Annotated[bool, typer.Option("--best", metavar="",
                                       help="evaluate the best trial of --experiment (by its search metric)")] = False,
    data_root: Annotated[str | None, typer.Option(help="folder with the IDX files (default: $FMNIST_DATA_DIR, data/)")] = None,
    png: Annotated[Path | None, typer.Option("--png", help="where to write the confusion matrix")] = None,
    log: Annotated[bool, typer.Option("--log", metavar="", help="attach the numbers and the PNG to the run in MLflow")] = False,
    dataset: DatasetOption = None,
    tracking_uri: TrackingOption = None,
) -> None:
    """Score a trained model on the test set: accuracy, per-class precision/recall, confusion matrix."""
    from fmnist_hpo.modelops.inference import confusion_lines
    from fmnist_hpo.modelops.operations import evaluate_and_report, resolve_model
    from fmnist_hpo.tracking.store import resolve_tracking_uri

    if target is not None and (best or experiment is not None):
        raise FmnistError(f"give a run id or checkpoint ({target!r}), or --experiment NAME for its best trial, not both")
    if target is None and experiment is None:
        raise FmnistError("give a run id or checkpoint, or --experiment NAME for its best trial")
    uri = resolve_tracking_uri(tracking_uri)
    resolved = resolve_model(target, uri, experiment)
    name = resolved.run_id or resolved.checkpoint.stem
    evaluation, written = evaluate_and_report(resolved, data_root, png or Path(f"confusion_{name}.png"), log, uri,
                                              dataset)
    typer.echo(f"{name}: test accuracy {evaluation.accuracy:.4f}, loss {evaluation.loss:.4f}")
    typer.echo(f"{'class':<12}{'precision':>10}{'recall':>8}")
    for i, cls in enumerate(evaluation.classes):
        typer.echo(f"{cls:<12}{evaluation.precision[i]:>10.4f}{evaluation.recall[i]:>8.4f}")
    typer.echo("confusion matrix (rows: true class, columns: predicted class)")
    typer.echo("\n".join(confusion_lines(evaluation.confusion, evaluation.classes)))
    typer.echo(f"wrote {written}" + (" and attached it to the run" if log else ""))


def predict(
    model: Annotated[str, typer.Argument(help="a run id or a checkpoint file")],
    images: Annotated[list[Path] | None, typer.Argument(
        metavar="IMAGE...", help="PNG/JPEG files, any size, colour or grayscale")] = None,
    idx: Annotated[Path | None, typer.Option(help="an IDX image file (gzipped or not) to predict instead")] = None,
    labels: Annotated[Path | None, typer.Option(
        help="IDX labels for --idx, to print the accuracy (default: the labels file beside it, if any)")] = None,
    limit: Annotated[int, typer.Option(min=0, help="--idx: print this many predictions (0: all)")] = 10,
    dataset: DatasetOption = None,
    tracking_uri: TrackingOption = None,
) -> None:
    """Class name and top-3 probabilities for images; with --idx and its labels, the accuracy."""
    from fmnist_hpo.modelops.inference import accuracy_line, top_k
    from fmnist_hpo.modelops.inputs import check_input_files, idx_inputs, picture_inputs
    from fmnist_hpo.modelops.operations import dataset_for, resolve_model
    from fmnist_hpo.tracking.store import resolve_tracking_uri

    if not images and idx is None:
        raise FmnistError("give image files, or --idx FILE")
    if labels is not None and idx is None:
        raise FmnistError("--labels goes with --idx FILE")
    check_input_files([*(images or []), *([idx] if idx is not None else []), *([labels] if labels is not None else [])])
    resolved = resolve_model(model, resolve_tracking_uri(tracking_uri))
    info = dataset_for(resolved, dataset)
    inputs = idx_inputs(idx, labels, limit, info) if idx is not None else picture_inputs(images, info)
    ranked_all = top_k(resolved.model, inputs.images, info)
    shown = len(inputs.names) if idx is None or not limit else min(limit, len(inputs.names))
    for name, ranked in zip(inputs.names[:shown], ranked_all, strict=False):
        typer.echo(f"{name}: {ranked[0][0]}  ({', '.join(f'{cls} {p:.3f}' for cls, p in ranked)})")
    if shown < inputs.total:
        typer.echo(f"... {inputs.total - shown} more not shown (--limit 0 prints all)")
    if inputs.truth is not None:
        typer.echo(accuracy_line(ranked_all, inputs.truth, inputs.labels, info))


def register(
    experiment: Annotated[str, typer.Option(help="experiment whose best trial to register")],
    name: Annotated[str, typer.Option(help="registered model name")] = "fmnist-cnn",
    tracking_uri: TrackingOption = None,
) -> None:
    """Register an experiment's best trial in the MLflow Model Registry and move the `champion` alias to it.

    A trial already registered under that name keeps its version; no identical new one is made.
    """
    from fmnist_hpo.modelops.operations import register_best
    from fmnist_hpo.tracking.store import resolve_tracking_uri

    registered = register_best(resolve_tracking_uri(tracking_uri), experiment, name)
    done = "already registered as" if registered["registered"] == "existing" else "registered"
    typer.echo(f"{done} {registered['name']} version {registered['version']} (alias champion) "
               f"from run {registered['run_id']}: {registered['model_uri']}")
