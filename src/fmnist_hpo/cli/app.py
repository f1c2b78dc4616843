"""The `fmnist` command: the app, its --version, the commands of each group in the order --help lists them,
and the one place an expected error becomes `error: message` on stderr and its exit code.

Heavy modules (torch, mlflow, hyperopt) are imported inside commands so `fmnist --help` is instant.
"""

from __future__ import annotations

import gc
import sys
from typing import Annotated, Any

import typer

from fmnist_hpo.cli import analyze, models, run, store
from fmnist_hpo.cli.help import ConventionalGroup, ConventionalHelp
from fmnist_hpo.errors import FmnistError


class FmnistGroup(ConventionalGroup):
    """Every command, and --version, ends an FmnistError as one line (a message of several problems keeps its
    one line per problem) and the error's exit code, never a traceback."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().main(*args, **kwargs)
        except FmnistError as exc:
            typer.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)


app = typer.Typer(
    help="Reproducible hyperparameter sweeps of BatchNorm CNNs on Fashion-MNIST, tracked in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=FmnistGroup,
)


def show_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"fmnist-hpo {version('fmnist-hpo')}")
        except PackageNotFoundError:
            raise FmnistError("fmnist-hpo is not installed (run from a source tree?): its version is unknown") from None
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", metavar="", callback=show_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    """Reproducible hyperparameter sweeps of BatchNorm CNNs on Fashion-MNIST, tracked in MLflow."""


for command in (run.run, run.validate, analyze.analyze, store.serve_ui, models.evaluate, models.predict,
                models.register, store.verify, run.schema):
    app.command(cls=ConventionalHelp)(command)  # every command: SPEC..., not <list[Path]>


def entry() -> None:
    """The `fmnist` console script. Its process skips the interpreter's last full garbage collection, which
    walks every object torch, mlflow and hyperopt made (1.5 s after a run, on a 2-core CPU): atexit handlers,
    and every object no reference cycle holds, are still finalized; the store commits as it goes."""
    try:
        app(prog_name="fmnist")
    finally:
        gc.freeze()
