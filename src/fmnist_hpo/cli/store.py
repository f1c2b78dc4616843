"""`fmnist serve-ui` and `verify`: the commands that open a store as it is."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from fmnist_hpo.cli.options import TrackingOption
from fmnist_hpo.errors import FmnistError


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
    from fmnist_hpo.tracking.serve import display_url, is_loopback, store_missing
    from fmnist_hpo.tracking.serve import serve_ui as serve
    from fmnist_hpo.tracking.store import resolve_tracking_uri

    configured = None
    if config is not None:
        from fmnist_hpo.config.loading import load

        configured = load(config).mlflow.tracking_uri
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

    raise typer.Exit(serve(uri, host, port, ready, create=create, experiment=experiment))


def verify(
    experiment: Annotated[list[str] | None, typer.Option("--experiment", "-e", help="experiment to check (repeatable)")] = None,
    all_experiments: Annotated[bool, typer.Option("--all", help="every experiment with fmnist runs")] = False,
    tracking_uri: TrackingOption = None,
    fmt: Annotated[str, typer.Option("--format", help="text or json")] = "text",
    rescore: Annotated[int | None, typer.Option(
        help="re-score only this many trials on the test set, best on validation first (default: all)", min=0)] = None,
    data_root: Annotated[str | None, typer.Option(
        help="folder of the IDX files (default: each trial's data.root, else $FMNIST_DATA_DIR, else data/)")] = None,
) -> None:
    """Check that a store's record still holds: statuses, histories, kept epochs, figures, checkpoints
    (re-scored on the test set), logged models, dataset digests and each sweep's selection.

    One line per problem, naming the run; a summary last. Exit 0 when everything holds, 1 when
    anything does not. Nothing is written.
    """
    import json

    from fmnist_hpo.modelops.verify import Request
    from fmnist_hpo.modelops.verify import verify as verify_store
    from fmnist_hpo.tracking.store import resolve_tracking_uri

    if fmt not in ("text", "json"):
        raise FmnistError(f"--format {fmt!r}: use text or json")
    if bool(experiment) == all_experiments:
        raise FmnistError("name the experiments to check (--experiment NAME, repeatable) or pass --all")
    report = verify_store(Request(resolve_tracking_uri(tracking_uri), experiment or [], all_experiments, rescore,
                                  data_root))
    typer.echo(json.dumps(report.as_json(), indent=2) if fmt == "json" else "\n".join(report.lines()))
    if not report.ok:
        raise typer.Exit(1)
