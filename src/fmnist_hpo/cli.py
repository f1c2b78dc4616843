"""The `fmnist` command. Commands parse options, call one plain function and map errors to exit codes.

Heavy modules (torch, mlflow, hyperopt) are imported inside commands so `fmnist --help` is instant.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from fmnist_hpo.errors import FmnistError, Terminated

app = typer.Typer(
    help="Reproducible hyperparameter sweeps of BatchNorm CNNs on Fashion-MNIST, tracked in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigArg = Annotated[Path, typer.Argument(help="experiment spec (YAML), e.g. configs/exp12.yaml")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="override a key, e.g. --set train.epochs=3 (repeatable)"),
]


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def collect_overrides(overrides: list[str] | None, **shortcuts: object) -> list[str]:
    """--set values plus the dedicated options (which win, being more specific)."""
    extra = [f"{key}={value}" for key, value in shortcuts.items() if value is not None]
    return [*(overrides or []), *extra]


@app.command()
def run(
    config: ConfigArg,
    overrides: SetOption = None,
    max_evals: Annotated[int | None, typer.Option(help="number of trials (search.max_evals)")] = None,
    parallel: Annotated[int | None, typer.Option(help="trials at once; above 1 runs on Ray Tune (search.parallel)")] = None,
    ray_address: Annotated[str | None, typer.Option(help="an existing Ray cluster (search.ray_address)")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cuda, mps or cpu (train.device)")] = None,
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment name (experiment)")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (mlflow.tracking_uri)")] = None,
    dry_run: Annotated[bool, typer.Option(help="print the resolved config and search space, train nothing")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted sweep of this config without asking")] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="start a new sweep even if one was interrupted")] = False,
    register_as: Annotated[str | None, typer.Option("--register", help="register the best trial under this model name")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="warnings and the closing table only")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="one line per epoch")] = False,
) -> None:
    """Run the sweep an experiment spec describes and log every trial to MLflow.

    An interrupted sweep of the same config (Ctrl-C, SIGTERM, a crash) is offered for resumption:
    its finished trials are kept, an unfinished trial continues from its last epoch.
    """
    if resume and fresh:
        raise fail("--resume and --fresh contradict each other; pass one")
    from fmnist_hpo import config as config_module

    all_overrides = collect_overrides(overrides, **{"search.max_evals": max_evals, "search.parallel": parallel,
                                                    "search.ray_address": ray_address, "train.device": device,
                                                    "experiment": experiment, "mlflow.tracking_uri": tracking_uri})
    try:
        cfg = config_module.load(config, all_overrides)
    except FmnistError as exc:
        raise fail(str(exc)) from None
    if dry_run:
        print_resolved(cfg)
        return
    from fmnist_hpo.progress import configure_logging, console, results_table
    from fmnist_hpo.sweep import SweepFailed, run_from_config

    configure_logging(-1 if quiet else (1 if verbose else 0))
    mode = "resume" if resume else "fresh" if fresh else "ask"
    ask = (lambda question: typer.confirm(question, default=True, err=True)) if sys.stdin.isatty() else None
    resume_command = shlex.join(["fmnist", "run", str(config), *(f"--set={o}" for o in all_overrides), "--resume"])
    try:
        with terminate_as_interrupt():
            result = run_from_config(cfg, show_bars=False if quiet else None, resume=mode, ask=ask)
    except SweepFailed as exc:
        console.print(results_table(exc.result))
        raise fail(str(exc), code=1) from None
    except FmnistError as exc:
        raise fail(str(exc)) from None
    except (KeyboardInterrupt, Terminated) as exc:
        code = 143 if isinstance(exc, Terminated) else 130
        raise fail(f"interrupted; finished trials are kept, continue with: {resume_command}", code=code) from None
    from rich.console import Console

    Console().print(results_table(result))
    best = result.best
    typer.echo(f"best trial {best.number}: val_accuracy={best.best_val_accuracy:.4f} "
               f"test_accuracy={best.test_accuracy:.4f} (run {best.run_id})")
    if register_as:
        from fmnist_hpo.modelops import register_best
        from fmnist_hpo.tracking import resolve_tracking_uri

        try:
            registered = register_best(resolve_tracking_uri(cfg.mlflow.tracking_uri), cfg.experiment, register_as,
                                       best.run_id)
        except FmnistError as exc:
            raise fail(str(exc)) from None
        typer.echo(f"registered {register_as} version {registered['version']} (alias champion)")


@app.command()
def validate(config: ConfigArg, overrides: SetOption = None) -> None:
    """Check a spec without training: print the resolved config and the search space."""
    from fmnist_hpo import config as config_module

    try:
        cfg = config_module.load(config, overrides)
    except FmnistError as exc:
        raise fail(str(exc)) from None
    print_resolved(cfg)


@app.command()
def analyze(
    experiment: Annotated[list[str] | None, typer.Option("--experiment", "-e", help="experiment to analyse (repeatable)")] = None,
    all_experiments: Annotated[bool, typer.Option("--all", help="every experiment with fmnist runs")] = False,
    compare: Annotated[tuple[str, str] | None, typer.Option(
        help="two groups to test: EXPERIMENT or EXPERIMENT:KEY=VALUE (e.g. exp13:model.dropout_placement=late)")] = None,
    metric: Annotated[str, typer.Option(help="metric for --compare: test_accuracy or kept_val_accuracy")] = "test_accuracy",
    fmt: Annotated[str, typer.Option("--format", help="table, markdown, csv or json")] = "table",
    plots: Annotated[Path | None, typer.Option(help="write PNG plots into this folder")] = None,
    report: Annotated[Path | None, typer.Option(help="write a markdown findings report to this file")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (default: sqlite:///mlflow.db)")] = None,
) -> None:
    """Turn logged runs into tables, statistics, plots and a findings report."""
    from fmnist_hpo.render import FORMATS

    if fmt not in FORMATS:
        raise fail(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    from fmnist_hpo.analyze_command import COMPARE_METRICS, AnalysisRequest, run_analysis

    if metric not in COMPARE_METRICS:
        raise fail(f"--metric {metric!r}: use {' or '.join(COMPARE_METRICS)}")
    from fmnist_hpo.render import render
    from fmnist_hpo.tracking import resolve_tracking_uri

    request = AnalysisRequest(resolve_tracking_uri(tracking_uri), experiment or [], all_experiments,
                              list(compare) if compare else None, metric,
                              str(plots) if plots else None, str(report) if report else None)
    try:
        result = run_analysis(request)
    except FmnistError as exc:
        raise fail(str(exc)) from None
    text = render(result.sections, fmt)
    if text is not None:
        typer.echo(text)
    for path in result.plots:
        typer.echo(f"wrote {path}", err=True)
    if result.report:
        typer.echo(f"wrote {result.report}", err=True)


@app.command("serve-ui")
def serve_ui(
    tracking_uri: Annotated[str | None, typer.Option(help="store to serve (default: sqlite:///mlflow.db)")] = None,
    config: Annotated[Path | None, typer.Option(help="serve the store this experiment spec logs to")] = None,
    experiment: Annotated[str | None, typer.Option(help="link to this experiment's runs (default: the latest sweep's)")] = None,
    create: Annotated[bool, typer.Option("--create", help="start an empty store if there is none yet")] = False,
    host: Annotated[str, typer.Option(help="interface to bind; not loopback: no login protects the UI")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 5001,
) -> None:
    """Open the MLflow UI (and tracking server) on the store `fmnist run` writes to.

    Prints the link to the training runs of --experiment (else of the latest sweep). A missing
    SQLite store is an error unless --create (or, on a terminal, a yes to the question) starts one.
    """
    from fmnist_hpo.serve import display_url, is_loopback, store_missing
    from fmnist_hpo.serve import serve_ui as serve
    from fmnist_hpo.tracking import resolve_tracking_uri

    configured = None
    if config is not None:
        from fmnist_hpo import config as config_module

        try:
            configured = config_module.load(config).mlflow.tracking_uri
        except FmnistError as exc:
            raise fail(str(exc)) from None
    uri = resolve_tracking_uri(tracking_uri or configured)
    if not is_loopback(host):
        typer.echo(f"warning: binding {host}: the MLflow UI has no login; anyone who can reach this port can read "
                   "and change every run", err=True)
    if not create and store_missing(uri) and sys.stdin.isatty():
        create = typer.confirm(f"No MLflow store at {uri} yet. Create an empty one?", default=False, err=True)
    typer.echo(f"starting MLflow for {uri} on {display_url(host, port)} ...")
    sys.stdout.flush()

    def ready(page: str, log: Path) -> None:
        typer.echo(f"MLflow UI at {page}  (server log {log}, removed on a clean stop; Ctrl-C to stop)")
        sys.stdout.flush()

    try:
        code = serve(uri, host, port, ready, create=create, experiment=experiment)
    except FmnistError as exc:
        raise fail(str(exc)) from None
    raise typer.Exit(code)


TrackingOption = Annotated[str | None, typer.Option(help="MLflow tracking URI (default: sqlite:///mlflow.db)")]


@app.command()
def evaluate(
    target: Annotated[str | None, typer.Argument(help="a run id or a checkpoint file")] = None,
    experiment: Annotated[str | None, typer.Option(help="with --best: the experiment whose best trial to use")] = None,
    best: Annotated[bool, typer.Option("--best", help="evaluate the experiment's best trial (by its search metric)")] = False,
    data_root: Annotated[str | None, typer.Option(help="folder with the IDX files (default: $FMNIST_DATA_DIR, data/)")] = None,
    png: Annotated[Path | None, typer.Option("--png", help="where to write the confusion matrix")] = None,
    log: Annotated[bool, typer.Option("--log", help="attach the numbers and the PNG to the run in MLflow")] = False,
    tracking_uri: TrackingOption = None,
) -> None:
    """Score a trained model on the test set: accuracy, per-class precision/recall, confusion matrix."""
    from fmnist_hpo.data import CLASSES
    from fmnist_hpo.modelops import evaluate_and_report, resolve_model
    from fmnist_hpo.tracking import resolve_tracking_uri

    if (target is None) != best or (best and experiment is None):
        raise fail("give a run id or checkpoint, or --experiment NAME --best")
    uri = resolve_tracking_uri(tracking_uri)
    try:
        resolved = resolve_model(target, uri, experiment)
        name = resolved.run_id or resolved.checkpoint.stem
        evaluation, written = evaluate_and_report(resolved, data_root, png or Path(f"confusion_{name}.png"), log, uri)
    except FmnistError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"{name}: test accuracy {evaluation.accuracy:.4f}, loss {evaluation.loss:.4f}")
    typer.echo(f"{'class':<12}{'precision':>10}{'recall':>8}")
    for i, cls in enumerate(CLASSES):
        typer.echo(f"{cls:<12}{evaluation.precision[i]:>10.4f}{evaluation.recall[i]:>8.4f}")
    typer.echo("confusion matrix (rows: true, columns: predicted)")
    for row in evaluation.confusion:
        typer.echo(" ".join(f"{count:5d}" for count in row))
    typer.echo(f"wrote {written}" + (" and attached it to the run" if log else ""))


@app.command()
def predict(
    model: Annotated[str, typer.Argument(help="a run id or a checkpoint file")],
    images: Annotated[list[Path] | None, typer.Argument(help="PNG/JPEG files, any size, colour or grayscale")] = None,
    idx: Annotated[Path | None, typer.Option(help="an IDX image file (gzipped or not) to predict instead")] = None,
    tracking_uri: TrackingOption = None,
) -> None:
    """Class name and top-3 probabilities for images."""
    import numpy as np

    from fmnist_hpo.data import read_idx
    from fmnist_hpo.inference import load_image, top_k
    from fmnist_hpo.modelops import resolve_model
    from fmnist_hpo.tracking import resolve_tracking_uri

    if not images and idx is None:
        raise fail("give image files, or --idx FILE")
    try:
        resolved = resolve_model(model, resolve_tracking_uri(tracking_uri))
        if idx is not None:
            batch = read_idx(idx)
            if batch.ndim != 3 or batch.shape[1:] != (28, 28):
                raise FmnistError(f"{idx}: expected 28x28 images, got shape {batch.shape}")
            names = [f"{idx.name}[{i}]" for i in range(len(batch))]
        else:
            batch = np.stack([load_image(path) for path in images])
            names = [str(path) for path in images]
    except FmnistError as exc:
        raise fail(str(exc)) from None
    for name, ranked in zip(names, top_k(resolved.model, batch), strict=True):
        shown = ", ".join(f"{cls} {p:.3f}" for cls, p in ranked)
        typer.echo(f"{name}: {ranked[0][0]}  ({shown})")


@app.command()
def register(
    experiment: Annotated[str, typer.Option(help="experiment whose best trial to register")],
    name: Annotated[str, typer.Option(help="registered model name")] = "fmnist-cnn",
    tracking_uri: TrackingOption = None,
) -> None:
    """Register an experiment's best trial in the MLflow Model Registry and move the `champion` alias to it.

    A trial already registered under that name keeps its version; no identical new one is made.
    """
    from fmnist_hpo.modelops import register_best
    from fmnist_hpo.tracking import resolve_tracking_uri

    try:
        registered = register_best(resolve_tracking_uri(tracking_uri), experiment, name)
    except FmnistError as exc:
        raise fail(str(exc)) from None
    done = "already registered as" if registered["registered"] == "existing" else "registered"
    typer.echo(f"{done} {registered['name']} version {registered['version']} (alias champion) "
               f"from run {registered['run_id']}: {registered['model_uri']}")


@app.command()
def schema(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write it to this file instead of stdout")] = None,
) -> None:
    """Print the JSON Schema (draft 2020-12) of the experiment spec, for editor completion and checks.

    The shipped copy is schema/fmnist-spec.schema.json; a spec opts in with the first line
    `# yaml-language-server: $schema=../schema/fmnist-spec.schema.json`.
    """
    from fmnist_hpo.schema import schema_text

    text = schema_text()
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        output.write_text(text)
    except OSError as exc:
        raise fail(f"{output}: cannot write the schema ({exc.strerror})") from None
    typer.echo(f"wrote {output}", err=True)


def print_resolved(cfg: object) -> None:
    from fmnist_hpo import config as config_module
    from fmnist_hpo.space import describe, planned_points

    typer.echo(config_module.dump_yaml(cfg).rstrip())
    search = cfg.search
    runs = planned_points(search.space, search.algo, search.max_evals) * search.repeats
    lines = describe(search.space)
    typer.echo(f"\n# search space: {search.algo if lines else 'empty'}, "
               f"{planned_points(search.space, search.algo, search.max_evals)} configuration(s) x {search.repeats} repeat(s) = {runs} run(s)")
    for line in lines:
        typer.echo(f"#   {line}")
