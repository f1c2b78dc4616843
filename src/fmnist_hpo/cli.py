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

from fmnist_hpo.errors import FmnistError

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


class Terminated(BaseException):
    """SIGTERM, raised where the sweep is, so it unwinds like Ctrl-C."""


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
    device: Annotated[str | None, typer.Option(help="auto, cuda, mps or cpu (train.device)")] = None,
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment name (experiment)")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (mlflow.tracking_uri)")] = None,
    dry_run: Annotated[bool, typer.Option(help="print the resolved config and search space, train nothing")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted sweep of this config without asking")] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="start a new sweep even if one was interrupted")] = False,
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

    all_overrides = collect_overrides(overrides, **{"search.max_evals": max_evals, "train.device": device,
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
    metric: Annotated[str, typer.Option(help="metric for --compare: test_accuracy or best_val_accuracy")] = "test_accuracy",
    fmt: Annotated[str, typer.Option("--format", help="table, markdown, csv or json")] = "table",
    plots: Annotated[Path | None, typer.Option(help="write PNG plots into this folder")] = None,
    report: Annotated[Path | None, typer.Option(help="write a markdown findings report to this file")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (default: sqlite:///mlflow.db)")] = None,
) -> None:
    """Turn logged runs into tables, statistics, plots and a findings report."""
    from fmnist_hpo.render import FORMATS

    if fmt not in FORMATS:
        raise fail(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if metric not in ("test_accuracy", "best_val_accuracy"):
        raise fail(f"--metric {metric!r}: use test_accuracy or best_val_accuracy")
    from fmnist_hpo.analyze import AnalysisRequest, run_analysis
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


def print_resolved(cfg: object) -> None:
    from fmnist_hpo import config as config_module
    from fmnist_hpo.space import describe, planned_points

    typer.echo(config_module.dump_yaml(cfg).rstrip())
    search = cfg.search
    runs = planned_points(search) * search.repeats
    lines = describe(search.space)
    typer.echo(f"\n# search space: {search.algo if lines else 'empty'}, "
               f"{planned_points(search)} configuration(s) x {search.repeats} repeat(s) = {runs} run(s)")
    for line in lines:
        typer.echo(f"#   {line}")
