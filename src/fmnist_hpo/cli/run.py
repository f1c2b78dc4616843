"""`fmnist run`, `validate` and `schema`: the commands that read experiment specs."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fmnist_hpo.errors import FmnistError
from fmnist_hpo.search.resume import ResumeMode

if TYPE_CHECKING:
    from fmnist_hpo.config.sections import Config
    from fmnist_hpo.search.resume import Ask
    from fmnist_hpo.search.run import Finished

ConfigArg = Annotated[Path, typer.Argument(metavar="SPEC", help="experiment spec (YAML), e.g. configs/exp12.yaml")]
ConfigsArg = Annotated[list[Path], typer.Argument(
    metavar="SPEC...",
    help="experiment spec(s) (YAML), e.g. configs/exp12.yaml; several run in order, each into its own experiment")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", metavar="KEY=VALUE", help="override a key, e.g. --set train.epochs=3 (repeatable)"),
]

RUN_SHORTCUT_FLAGS = {"search.max_evals": "--max-evals", "search.parallel": "--parallel",
                      "search.ray_address": "--ray-address", "train.device": "--device",
                      "experiment": "--experiment", "mlflow.tracking_uri": "--tracking-uri"}


def collect_overrides(overrides: list[str] | None, **shortcuts: object) -> list[str]:
    """--set values plus the dedicated options (which win, being more specific)."""
    extra = [f"{key}={value}" for key, value in shortcuts.items() if value is not None]
    return [*(overrides or []), *extra]


def run(
    configs: ConfigsArg,
    overrides: SetOption = None,
    max_evals: Annotated[int | None, typer.Option(help="number of trials (search.max_evals)")] = None,
    parallel: Annotated[str | None, typer.Option(
        help="trials at once: a number, or auto (as many as fit on the GPU); above 1 runs on Ray Tune (search.parallel)")] = None,
    ray_address: Annotated[str | None, typer.Option(help="an existing Ray cluster (search.ray_address)")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cuda, mps or cpu (train.device)")] = None,
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment name (experiment)")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (mlflow.tracking_uri)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", metavar="",
                                          help="check the specs and this machine, show what a run would use and "
                                               "estimate its time")] = False,
    resume: Annotated[bool, typer.Option("--resume", metavar="",
                                         help="continue an interrupted sweep of this config without asking")] = False,
    fresh: Annotated[bool, typer.Option("--fresh", metavar="", help="start a new sweep even if one was interrupted")] = False,
    register_as: Annotated[str | None, typer.Option("--register", help="register the best trial under this model name")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", metavar="", help="warnings and the closing table only")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", metavar="", help="one line per epoch")] = False,
) -> None:
    """Run the sweep each experiment spec describes and log every trial to MLflow.

    An interrupted sweep of the same config (Ctrl-C, SIGTERM, a crash) is offered for resumption:
    its finished trials are kept, an unfinished trial continues from its last epoch. With several
    specs, each is validated before any runs; rerunning the same command skips the specs whose
    sweeps finished and continues the one that was interrupted.
    """
    from fmnist_hpo.search.run import load_specs, print_estimates, run_specs

    if resume and fresh:
        raise FmnistError("--resume and --fresh contradict each other; pass one")
    if len(configs) > 1 and (experiment or register_as):
        raise FmnistError("--experiment and --register take one spec; with several, each runs into its own experiment")
    shortcuts = {"search.max_evals": max_evals, "search.parallel": parallel, "search.ray_address": ray_address,
                 "train.device": device, "experiment": experiment, "mlflow.tracking_uri": tracking_uri}
    all_overrides = collect_overrides(overrides, **shortcuts)
    flags = {k: RUN_SHORTCUT_FLAGS[k] for k, v in shortcuts.items() if v is not None}
    cfgs = load_specs(configs, all_overrides, flags)
    if dry_run:
        if len(cfgs) == 1:
            print_resolved(cfgs[0])
        print_estimates(cfgs)
        return
    from fmnist_hpo.search.progress import configure_logging

    configure_logging(-1 if quiet else (1 if verbose else 0))
    mode = ResumeMode.RESUME if resume else ResumeMode.FRESH if fresh else ResumeMode.ASK
    resume_command = shlex.join(["fmnist", "run", *map(str, configs), *(f"--set={o}" for o in all_overrides), "--resume"])
    finished = run_specs(cfgs, mode, quiet, resume_command, ask_on_terminal())
    if register_as and finished is not None:  # --register takes one spec
        register_best_trial(finished, register_as)


def register_best_trial(finished: Finished, name: str) -> None:
    from fmnist_hpo.errors import Terminated
    from fmnist_hpo.modelops.operations import register_best
    from fmnist_hpo.search.interrupts import stop_on_signals
    from fmnist_hpo.search.run import RunStopped, signal_exit_code

    result = finished.result
    try:
        with stop_on_signals():
            registered = register_best(finished.tracking_uri, result.experiment, name, result.best.run_id)
    except (KeyboardInterrupt, Terminated) as exc:
        raise RunStopped(f"interrupted while registering; the sweep is finished, register its best trial with: "
                         f"fmnist register --experiment {result.experiment} --name {name}", signal_exit_code(exc)) from None
    done = "already registered as" if registered["registered"] == "existing" else "registered"
    typer.echo(f"{done} {name} version {registered['version']} (alias champion)")


def ask_on_terminal() -> Ask:
    """How to ask whether to continue an interrupted sweep; None off a terminal (it then continues)."""
    return (lambda question: typer.confirm(question, default=True, err=True)) if sys.stdin.isatty() else None


def validate(config: ConfigArg, overrides: SetOption = None) -> None:
    """Check a spec and this machine without training: print what a run would use and the search space."""

    from fmnist_hpo.config.loading import load

    print_resolved(load(config, overrides or []))


def schema(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write it to this file instead of stdout")] = None,
) -> None:
    """Print the JSON Schema (draft 2020-12) of the experiment spec, for editor completion and checks.

    The shipped copy is schema/fmnist-spec.schema.json; a spec opts in with the first line
    `# yaml-language-server: $schema=../schema/fmnist-spec.schema.json`.
    """
    from fmnist_hpo.config.schema import schema_text

    text = schema_text()
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        output.write_text(text)
    except OSError as exc:
        raise FmnistError(f"{output}: cannot write the schema ({exc.strerror})") from None
    typer.echo(f"wrote {output}", err=True)


def print_resolved(cfg: Config) -> None:
    """The config as YAML with `auto` and `null` replaced by what a run uses here, then the search space
    (or the error the run would hit at once on this machine)."""
    import yaml

    from fmnist_hpo.config.loading import to_dict
    from fmnist_hpo.config.space import describe, planned_points
    from fmnist_hpo.search.preflight import preflight

    resolved = preflight(cfg)
    raw = to_dict(cfg)
    raw["models_dir"] = str(resolved.checkpoint_dir.parent)
    raw["data"]["root"] = str(resolved.data_root)
    raw["train"]["device"] = resolved.device
    raw["train"]["precision"] = resolved.precision
    raw["mlflow"]["tracking_uri"] = resolved.tracking_uri
    typer.echo("\n".join(["# resolved for this machine:", *(f"#   {line}" for line in resolved.describe())]))
    typer.echo(yaml.safe_dump(raw, sort_keys=False).rstrip())
    search = cfg.search
    points = planned_points(search.space, search.algo, search.max_evals)
    lines = describe(search.space)
    typer.echo(f"\n# search space: {search.algo if lines else 'empty'}, "
               f"{points} configuration(s) x {search.repeats} repeat(s) = {points * search.repeats} run(s)")
    for line in lines:
        typer.echo(f"#   {line}")
