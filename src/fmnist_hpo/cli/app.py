"""The `fmnist` command. Commands parse options, call one plain function and map errors to exit codes.

Heavy modules (torch, mlflow, hyperopt) are imported inside commands so `fmnist --help` is instant.
"""

from __future__ import annotations

import contextlib
import functools
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fmnist_hpo.cli.help import ConventionalGroup, ConventionalHelp
from fmnist_hpo.errors import FmnistError, MachineFailure, Terminated
from fmnist_hpo.search.resume import ResumeMode

if TYPE_CHECKING:
    from fmnist_hpo.config.sections import Config
    from fmnist_hpo.search.preflight import Resolved

app = typer.Typer(
    help="Reproducible hyperparameter sweeps of BatchNorm CNNs on Fashion-MNIST, tracked in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=ConventionalGroup,
)
app.command = functools.partial(app.command, cls=ConventionalHelp)  # every command: SPEC..., not <list[Path]>

ConfigArg = Annotated[Path, typer.Argument(metavar="SPEC", help="experiment spec (YAML), e.g. configs/exp12.yaml")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", metavar="KEY=VALUE", help="override a key, e.g. --set train.epochs=3 (repeatable)"),
]


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print `error: message` on stderr (a message of several problems keeps its one line per problem)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def show_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"fmnist-hpo {version('fmnist-hpo')}")
        except PackageNotFoundError:
            raise fail("fmnist-hpo is not installed (run from a source tree?): its version is unknown") from None
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", metavar="", callback=show_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    """Reproducible hyperparameter sweeps of BatchNorm CNNs on Fashion-MNIST, tracked in MLflow."""


def terminate_as_interrupt() -> contextlib.AbstractContextManager:
    """Ctrl-C and SIGTERM unwind the sweep, even when the signal lands where Python ignores exceptions."""
    from fmnist_hpo.search.interrupts import stop_on_signals

    return stop_on_signals()


def collect_overrides(overrides: list[str] | None, **shortcuts: object) -> list[str]:
    """--set values plus the dedicated options (which win, being more specific)."""
    extra = [f"{key}={value}" for key, value in shortcuts.items() if value is not None]
    return [*(overrides or []), *extra]


RUN_SHORTCUT_FLAGS = {"search.max_evals": "--max-evals", "search.parallel": "--parallel",
                      "search.ray_address": "--ray-address", "train.device": "--device",
                      "experiment": "--experiment", "mlflow.tracking_uri": "--tracking-uri"}


def load_config(path: Path, overrides: list[str], flags: dict[str, str] | None = None) -> Config:
    """The validated spec, or exit 2 naming the file, `--set` or the option each problem came from."""
    from fmnist_hpo.config.loading import load

    try:
        return load(path, overrides, flags)
    except FmnistError as exc:
        raise fail(str(exc)) from None


def checked(cfg: Config) -> Resolved:
    """What a run will use on this machine, or exit 2 with the first thing that would fail."""
    from fmnist_hpo.search.preflight import preflight

    try:
        return preflight(cfg)
    except FmnistError as exc:
        raise fail(str(exc)) from None


ConfigsArg = Annotated[list[Path], typer.Argument(
    metavar="SPEC...",
    help="experiment spec(s) (YAML), e.g. configs/exp12.yaml; several run in order, each into its own experiment")]


@app.command()
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
    if resume and fresh:
        raise fail("--resume and --fresh contradict each other; pass one")
    if len(configs) > 1 and (experiment or register_as):
        raise fail("--experiment and --register take one spec; with several, each runs into its own experiment")
    shortcuts = {"search.max_evals": max_evals, "search.parallel": parallel, "search.ray_address": ray_address,
                 "train.device": device, "experiment": experiment, "mlflow.tracking_uri": tracking_uri}
    all_overrides = collect_overrides(overrides, **shortcuts)
    flags = {k: RUN_SHORTCUT_FLAGS[k] for k, v in shortcuts.items() if v is not None}
    cfgs = load_configs(configs, all_overrides, flags)
    if dry_run:
        if len(cfgs) == 1:
            print_resolved(cfgs[0], checked(cfgs[0]))
        print_estimates(cfgs)
        return
    from fmnist_hpo.search.progress import configure_logging

    configure_logging(-1 if quiet else (1 if verbose else 0))
    mode = ResumeMode.RESUME if resume else ResumeMode.FRESH if fresh else ResumeMode.ASK
    resume_command = shlex.join(["fmnist", "run", *map(str, configs), *(f"--set={o}" for o in all_overrides), "--resume"])
    try:
        with terminate_as_interrupt():  # from the start: a signal during store creation lands cleanly too
            if len(cfgs) == 1:
                run_one(cfgs[0], mode, quiet, resume_command, register_as)
            else:
                run_several(cfgs, ResumeMode.CONTINUE if resume else mode, quiet, resume_command)
    except (KeyboardInterrupt, Terminated) as exc:  # the sweep had not started: nothing to resume
        raise fail("interrupted before the sweep started", code=143 if isinstance(exc, Terminated) else 130) from None


def ask_on_terminal() -> object:
    """How to ask whether to continue an interrupted sweep; None off a terminal (it then continues)."""
    return (lambda question: typer.confirm(question, default=True, err=True)) if sys.stdin.isatty() else None


def interrupted(exc: BaseException, resume_command: str) -> typer.Exit:
    if isinstance(exc, MachineFailure):  # EX_TEMPFAIL: nothing is lost, the same command works once it is fixed
        return fail(f"{exc.cause}; {exc.fix}, then: {resume_command}", code=75)
    code = 143 if isinstance(exc, Terminated) else 130
    return fail(f"interrupted; finished trials are kept, continue with: {resume_command}", code=code)


def run_one(cfg: Config, mode: ResumeMode, quiet: bool, resume_command: str, register_as: str | None) -> None:
    from fmnist_hpo.search.progress import console, preparing, results_table

    with preparing("checking the device, the data and the store", show_spinner=not quiet):
        resolved = checked(cfg)
        from fmnist_hpo.search.sweep import SweepFailed, run_from_config
    if not quiet:
        typer.echo(f"{cfg.experiment}: {'; '.join(resolved.describe())}")
    earlier = finished_before_or_fail(cfg) if mode == ResumeMode.ASK else None
    if earlier is not None:
        typer.echo(f"{cfg.experiment}: finished before (sweep {earlier.parent_run_id}); --fresh to rerun")
    try:
        with terminate_as_interrupt(), preparing("loading the data and opening the store", not quiet) as ready:
            result = earlier or run_from_config(cfg, resolved=resolved, show_bars=False if quiet else None, mode=mode,
                                                ask=ask_on_terminal(), on_ready=ready)
    except SweepFailed as exc:
        console.print(results_table(exc.result))
        raise fail(str(exc), code=1) from None
    except MachineFailure as exc:
        raise interrupted(exc, resume_command) from None
    except FmnistError as exc:
        raise fail(str(exc)) from None
    except (KeyboardInterrupt, Terminated) as exc:
        raise interrupted(exc, resume_command) from None
    from rich.console import Console

    Console(width=None if sys.stdout.isatty() else 120).print(results_table(result))
    best = result.best
    typer.echo(selected_line(result))
    typer.echo(f"runs of {result.experiment} are in {resolved.tracking_uri}; "
               f"best checkpoint: {best.checkpoint or 'none written'}")
    if register_as:
        from fmnist_hpo.modelops.operations import register_best

        try:
            registered = register_best(resolved.tracking_uri, cfg.experiment, register_as, best.run_id)
        except FmnistError as exc:
            raise fail(str(exc)) from None
        done = "already registered as" if registered["registered"] == "existing" else "registered"
        typer.echo(f"{done} {register_as} version {registered['version']} (alias champion)")


def finished_before_or_fail(cfg: Config) -> object:
    """The finished sweep of exactly this config (like several specs, one is not retrained silently), or None."""
    from fmnist_hpo.search.plan import finished_before

    try:
        return finished_before(cfg)
    except FmnistError as exc:
        raise fail(str(exc)) from None


def run_several(cfgs: list[Config], mode: ResumeMode, quiet: bool, resume_command: str) -> None:
    """Each spec in order into its own experiment; a closing table with a row per experiment."""
    from rich.console import Console

    from fmnist_hpo.search.plan import run_spec
    from fmnist_hpo.search.progress import preparing, study_table

    with preparing("checking the device, the data and the stores", show_spinner=not quiet):
        resolved = [checked(cfg) for cfg in cfgs]  # every machine check before anything runs
    outcomes = []
    try:
        with terminate_as_interrupt():
            for cfg, where in zip(cfgs, resolved, strict=True):
                if not quiet:
                    typer.echo(f"{cfg.experiment}: {'; '.join(where.describe())}")
                with preparing("loading the data and opening the store", not quiet) as ready:
                    outcomes.append(run_spec(cfg, where, mode, ask_on_terminal(), False if quiet else None, ready))
    except MachineFailure as exc:
        raise interrupted(exc, resume_command) from None
    except FmnistError as exc:
        raise fail(str(exc)) from None
    except (KeyboardInterrupt, Terminated) as exc:
        if outcomes:
            Console(stderr=True).print(study_table(outcomes))
        raise interrupted(exc, resume_command) from None
    Console(width=None if sys.stdout.isatty() else 120).print(study_table(outcomes))
    failed = [o.experiment for o in outcomes if o.status == "failed"]
    if failed:
        raise fail(f"every trial failed in: {', '.join(failed)}", code=1)


def load_configs(paths: list[Path], overrides: list[str], flags: dict[str, str]) -> list[Config]:
    """Every spec validated before anything runs; the problems of all of them reported together."""
    from fmnist_hpo.config.loading import load

    configs, problems = [], []
    for path in paths:
        try:
            configs.append(load(path, overrides, flags))
        except FmnistError as exc:
            problems.append(str(exc))
    if problems:
        raise fail("\n".join(problems))
    from fmnist_hpo.search.plan import check_distinct_experiments

    try:
        check_distinct_experiments(list(zip(paths, configs, strict=True)))
    except FmnistError as exc:
        raise fail(str(exc)) from None
    return configs


def print_estimates(cfgs: list[Config]) -> None:
    """Planned runs and epochs per experiment, and a wall-time estimate from a short timing probe."""
    import torch

    from fmnist_hpo.search.plan import SWEEP_FIXED_SECONDS, duration, estimate

    resolved = [checked(cfg) for cfg in cfgs]
    cache: dict = {}
    estimates = [estimate(cfg, torch.device(where.device), cache, on_probe=lambda text: typer.echo(f"# {text} ...", err=True))
                 for cfg, where in zip(cfgs, resolved, strict=True)]
    devices = ", ".join(dict.fromkeys(where.device for where in resolved))
    typer.echo(f"\n# rough estimate on {devices}, from a short timing probe of each model: every epoch run (early "
               "stopping and pruning only shorten it), plus per run its test pass, warm-up and logging, and "
               f"~{SWEEP_FIXED_SECONDS:.0f} s per experiment to start; a busy machine takes longer")
    for e in estimates:
        typer.echo(f"#   {e.experiment}: {e.runs} run(s) x up to {e.epochs} epoch(s), {e.epoch_seconds:.1f} s/epoch "
                   f"+ {e.fixed_seconds:.1f} s per run: about {duration(e.total_seconds)}")
    typer.echo(f"#   total: about {duration(sum(e.total_seconds for e in estimates))}")


@app.command()
def validate(config: ConfigArg, overrides: SetOption = None) -> None:
    """Check a spec and this machine without training: print what a run would use and the search space."""
    cfg = load_config(config, overrides or [])
    print_resolved(cfg, checked(cfg))


@app.command()
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
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (default: sqlite:///mlflow.db)")] = None,
) -> None:
    """Turn logged runs into tables, statistics, plots and a findings report."""
    from fmnist_hpo.analysis.render import FORMATS

    if fmt not in FORMATS:
        raise fail(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    from fmnist_hpo.analysis.analyze_command import COMPARE_METRICS, AnalysisRequest, run_analysis

    if metric not in COMPARE_METRICS:
        raise fail(f"--metric {metric!r}: use {' or '.join(COMPARE_METRICS)}")
    from fmnist_hpo.analysis.render import render
    from fmnist_hpo.tracking.store import resolve_tracking_uri

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
    from fmnist_hpo.tracking.serve import display_url, is_loopback, store_missing
    from fmnist_hpo.tracking.serve import serve_ui as serve
    from fmnist_hpo.tracking.store import resolve_tracking_uri

    configured = None
    if config is not None:
        from fmnist_hpo.config.loading import load

        try:
            configured = load(config).mlflow.tracking_uri
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
DatasetOption = Annotated[str | None, typer.Option(
    help="fashion-mnist, mnist or kmnist; must be the one the model was trained on (default: that one)")]


@app.command()
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
        raise fail(f"give a run id or checkpoint ({target!r}), or --experiment NAME for its best trial, not both")
    if target is None and experiment is None:
        raise fail("give a run id or checkpoint, or --experiment NAME for its best trial")
    uri = resolve_tracking_uri(tracking_uri)
    try:
        resolved = resolve_model(target, uri, experiment)
        name = resolved.run_id or resolved.checkpoint.stem
        evaluation, written = evaluate_and_report(resolved, data_root, png or Path(f"confusion_{name}.png"), log, uri,
                                                  dataset)
    except FmnistError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"{name}: test accuracy {evaluation.accuracy:.4f}, loss {evaluation.loss:.4f}")
    typer.echo(f"{'class':<12}{'precision':>10}{'recall':>8}")
    for i, cls in enumerate(evaluation.classes):
        typer.echo(f"{cls:<12}{evaluation.precision[i]:>10.4f}{evaluation.recall[i]:>8.4f}")
    typer.echo("confusion matrix (rows: true class, columns: predicted class)")
    typer.echo("\n".join(confusion_lines(evaluation.confusion, evaluation.classes)))
    typer.echo(f"wrote {written}" + (" and attached it to the run" if log else ""))


@app.command()
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
        raise fail("give image files, or --idx FILE")
    if labels is not None and idx is None:
        raise fail("--labels goes with --idx FILE")
    try:
        check_input_files([*(images or []), *([idx] if idx is not None else []), *([labels] if labels is not None else [])])
        resolved = resolve_model(model, resolve_tracking_uri(tracking_uri))
        info = dataset_for(resolved, dataset)
        inputs = idx_inputs(idx, labels, limit, info) if idx is not None else picture_inputs(images, info)
    except FmnistError as exc:
        raise fail(str(exc)) from None
    ranked_all = top_k(resolved.model, inputs.images, info)
    shown = len(inputs.names) if idx is None or not limit else min(limit, len(inputs.names))
    for name, ranked in zip(inputs.names[:shown], ranked_all, strict=False):
        typer.echo(f"{name}: {ranked[0][0]}  ({', '.join(f'{cls} {p:.3f}' for cls, p in ranked)})")
    if shown < inputs.total:
        typer.echo(f"... {inputs.total - shown} more not shown (--limit 0 prints all)")
    if inputs.truth is not None:
        typer.echo(accuracy_line(ranked_all, inputs.truth, inputs.labels, info))


@app.command()
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

    try:
        registered = register_best(resolve_tracking_uri(tracking_uri), experiment, name)
    except FmnistError as exc:
        raise fail(str(exc)) from None
    done = "already registered as" if registered["registered"] == "existing" else "registered"
    typer.echo(f"{done} {registered['name']} version {registered['version']} (alias champion) "
               f"from run {registered['run_id']}: {registered['model_uri']}")


@app.command()
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
        raise fail(f"--format {fmt!r}: use text or json")
    if bool(experiment) == all_experiments:
        raise fail("name the experiments to check (--experiment NAME, repeatable) or pass --all")
    try:
        report = verify_store(Request(resolve_tracking_uri(tracking_uri), experiment or [], all_experiments, rescore,
                                      data_root))
    except FmnistError as exc:
        raise fail(str(exc)) from None
    typer.echo(json.dumps(report.as_json(), indent=2) if fmt == "json" else "\n".join(report.lines()))
    if not report.ok:
        raise typer.Exit(1)


@app.command()
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
        raise fail(f"{output}: cannot write the schema ({exc.strerror})") from None
    typer.echo(f"wrote {output}", err=True)


def selected_line(result: object) -> str:
    """The selected configuration in one line: its run, or the mean over its repeats."""
    chosen = result.selection
    best = chosen.representative
    if len(chosen.runs) == 1:
        return (f"best trial {best.number}: val_accuracy={best.kept_val_accuracy:.4f} "
                f"test_accuracy={best.test_accuracy:.4f} (run {best.run_id})")
    val = chosen.mean(lambda t: t.kept_val_accuracy)
    test, spread = chosen.mean(lambda t: t.test_accuracy), chosen.std(lambda t: t.test_accuracy)
    return (f"best configuration (trial {best.number} and its {len(chosen.runs) - 1} repeats): mean val_accuracy="
            f"{val:.4f} test_accuracy={test:.4f} ± {spread:.4f} (run {best.run_id} stands for it)")


def print_resolved(cfg: Config, resolved: Resolved) -> None:
    """The config as YAML with `auto` and `null` replaced by what a run uses here, then the search space."""
    import yaml

    from fmnist_hpo.config.loading import to_dict
    from fmnist_hpo.config.space import describe, planned_points

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
