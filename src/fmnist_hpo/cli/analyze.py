"""`fmnist analyze`: logged runs turned into tables, statistics, plots and a findings report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fmnist_hpo.cli.options import TrackingOption
from fmnist_hpo.errors import FmnistError


def analyze(
    experiment: Annotated[list[str] | None, typer.Option("--experiment", "-e", help="experiment to analyse (repeatable)")] = None,
    all_experiments: Annotated[bool, typer.Option("--all", help="every experiment with fmnist runs")] = False,
    compare: Annotated[tuple[str, str] | None, typer.Option(
        metavar="A B",
        help="two groups to test: EXPERIMENT or EXPERIMENT:KEY=VALUE (e.g. exp13:model.dropout_placement=late)")] = None,
    metric: Annotated[str, typer.Option(help="metric for --compare: test_accuracy or kept_val_accuracy")] = "test_accuracy",
    fmt: Annotated[str, typer.Option("--format", help="table, markdown, csv or json")] = "table",
    plots: Annotated[Path | None, typer.Option(help="write PNG plots into this folder")] = None,
    report: Annotated[Path | None, typer.Option(help="write a markdown findings report to this file")] = None,
    tracking_uri: TrackingOption = None,
) -> None:
    """Turn logged runs into tables, statistics, plots and a findings report."""
    from fmnist_hpo.analysis.render import FORMATS

    if fmt not in FORMATS:
        raise FmnistError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    from fmnist_hpo.analysis.analyze_command import COMPARE_METRICS, AnalysisRequest, run_analysis

    if metric not in COMPARE_METRICS:
        raise FmnistError(f"--metric {metric!r}: use {' or '.join(COMPARE_METRICS)}")
    from fmnist_hpo.analysis.render import render
    from fmnist_hpo.tracking.store import resolve_tracking_uri

    request = AnalysisRequest(resolve_tracking_uri(tracking_uri), experiment or [], all_experiments,
                              list(compare) if compare else None, metric,
                              str(plots) if plots else None, str(report) if report else None)
    result = run_analysis(request)
    text = render(result.sections, fmt)
    if text is not None:
        typer.echo(text)
    for path in result.plots:
        typer.echo(f"wrote {path}", err=True)
    if result.report:
        typer.echo(f"wrote {result.report}", err=True)
