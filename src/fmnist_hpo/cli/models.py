"""`fmnist evaluate`, `predict` and `register`: the commands that use a trained model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fmnist_hpo.cli.options import TrackingOption
from fmnist_hpo.errors import FmnistError


def evaluate(
    target: Annotated[str | None, typer.Argument(help="a run id or a checkpoint file")] = None,
    experiment: Annotated[str | None, typer.Option(help="evaluate this experiment's best trial (implies --best)")] = None,
    best: Annotated[bool, typer.Option("--best", metavar="",
                                       help="evaluate the best trial of --experiment (by its search metric)")] = False,
    data_root: Annotated[str | None, typer.Option(help="folder with the IDX files (default: $FMNIST_DATA_DIR, data/)")] = None,
    png: Annotated[Path | None, typer.Option("--png", help="where to write the confusion matrix")] = None,
    log: Annotated[bool, typer.Option("--log", metavar="", help="attach the numbers and the PNG to the run in MLflow")] = False,
    tracking_uri: TrackingOption = None,
) -> None:
    """Score a trained model on the test set: accuracy, per-class precision/recall, confusion matrix."""
    from fmnist_hpo.data.datasets import CLASSES
    from fmnist_hpo.modelops.inference import confusion_lines
    from fmnist_hpo.modelops.operations import evaluate_and_report, resolve_model
    from fmnist_hpo.tracking.tracker import resolve_tracking_uri

    if target is not None and (best or experiment is not None):
        raise FmnistError(f"give a run id or checkpoint ({target!r}), or --experiment NAME for its best trial, not both")
    if target is None and experiment is None:
        raise FmnistError("give a run id or checkpoint, or --experiment NAME for its best trial")
    uri = resolve_tracking_uri(tracking_uri)
    resolved = resolve_model(target, uri, experiment)
    name = resolved.run_id or resolved.checkpoint.stem
    evaluation, written = evaluate_and_report(resolved, data_root, png or Path(f"confusion_{name}.png"), log, uri)
    typer.echo(f"{name}: test accuracy {evaluation.accuracy:.4f}, loss {evaluation.loss:.4f}")
    typer.echo(f"{'class':<12}{'precision':>10}{'recall':>8}")
    for i, cls in enumerate(CLASSES):
        typer.echo(f"{cls:<12}{evaluation.precision[i]:>10.4f}{evaluation.recall[i]:>8.4f}")
    typer.echo("confusion matrix (rows: true class, columns: predicted class)")
    typer.echo("\n".join(confusion_lines(evaluation.confusion)))
    typer.echo(f"wrote {written}" + (" and attached it to the run" if log else ""))


def predict(
    model: Annotated[str, typer.Argument(help="a run id or a checkpoint file")],
    images: Annotated[list[Path] | None, typer.Argument(
        metavar="IMAGE...", help="PNG/JPEG files, any size, colour or grayscale")] = None,
    idx: Annotated[Path | None, typer.Option(help="an IDX image file (gzipped or not) to predict instead")] = None,
    labels: Annotated[Path | None, typer.Option(
        help="IDX labels for --idx, to print the accuracy (default: the labels file beside it, if any)")] = None,
    limit: Annotated[int, typer.Option(min=0, help="--idx: print this many predictions (0: all)")] = 10,
    tracking_uri: TrackingOption = None,
) -> None:
    """Class name and top-3 probabilities for images; with --idx and its labels, the accuracy."""
    import numpy as np

    from fmnist_hpo.data.datasets import read_idx
    from fmnist_hpo.modelops.inference import accuracy_line, labels_beside, load_image, read_labels, top_k
    from fmnist_hpo.modelops.operations import resolve_model
    from fmnist_hpo.tracking.tracker import resolve_tracking_uri

    if not images and idx is None:
        raise FmnistError("give image files, or --idx FILE")
    if labels is not None and idx is None:
        raise FmnistError("--labels goes with --idx FILE")
    for path in [*(images or []), *([idx] if idx is not None else []), *([labels] if labels is not None else [])]:
        if not path.is_file():
            raise FmnistError(f"{path}: {'is a directory, not an image file' if path.is_dir() else 'no such file'}")
    truth = None
    resolved = resolve_model(model, resolve_tracking_uri(tracking_uri))
    if idx is not None:
        batch = read_idx(idx, item_shape=(28, 28))  # the header is checked before the data is inflated
        if batch.ndim != 3 or batch.shape[1:] != (28, 28):
            raise FmnistError(f"{idx}: expected 28x28 images, got shape {batch.shape}")
        labels = labels or labels_beside(idx)
        truth = read_labels(labels, len(batch)) if labels is not None else None
        total = len(batch)
        if truth is None and limit:
            batch = batch[:limit]  # nothing to score: predict only what is printed
        names = [f"{idx.name}[{i}]" for i in range(len(batch))]
    else:
        batch = np.stack([load_image(path) for path in images])
        names = [str(path) for path in images]
        total = len(names)
    ranked_all = top_k(resolved.model, batch)
    shown = len(names) if idx is None or not limit else min(limit, len(names))
    for name, ranked in zip(names[:shown], ranked_all, strict=False):
        typer.echo(f"{name}: {ranked[0][0]}  ({', '.join(f'{cls} {p:.3f}' for cls, p in ranked)})")
    if shown < total:
        typer.echo(f"... {total - shown} more not shown (--limit 0 prints all)")
    if truth is not None:
        typer.echo(accuracy_line(ranked_all, truth, labels))


def register(
    experiment: Annotated[str, typer.Option(help="experiment whose best trial to register")],
    name: Annotated[str, typer.Option(help="registered model name")] = "fmnist-cnn",
    tracking_uri: TrackingOption = None,
) -> None:
    """Register an experiment's best trial in the MLflow Model Registry and move the `champion` alias to it.

    A trial already registered under that name keeps its version; no identical new one is made.
    """
    from fmnist_hpo.modelops.operations import register_best
    from fmnist_hpo.tracking.tracker import resolve_tracking_uri

    registered = register_best(resolve_tracking_uri(tracking_uri), experiment, name)
    done = "already registered as" if registered["registered"] == "existing" else "registered"
    typer.echo(f"{done} {registered['name']} version {registered['version']} (alias champion) "
               f"from run {registered['run_id']}: {registered['model_uri']}")
