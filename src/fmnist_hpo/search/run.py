"""Running specs as `fmnist run` does: all of them checked before any runs, one sweep or several in order,
Ctrl-C and SIGTERM unwinding them, and a run cut short told as one line and the exit code that says why.

It prints what a user reads around the progress: where a sweep works, its closing table, where its results are.
Heavy modules are imported as each step needs them, so the spinner of that step covers their import.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fmnist_hpo.config.loading import load
from fmnist_hpo.errors import FmnistError, MachineFailure, Terminated
from fmnist_hpo.records import SpecStatus
from fmnist_hpo.search.resume import Ask, ResumeMode

if TYPE_CHECKING:
    from fmnist_hpo.config.sections import Config
    from fmnist_hpo.records import SweepResult



class RunStopped(FmnistError):
    """A run cut short: 1 every trial failed, 75 the machine failed (EX_TEMPFAIL: nothing is lost, the same
    command works once it is fixed), 130 Ctrl-C, 143 SIGTERM."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def signal_exit_code(exc: BaseException) -> int:
    return 143 if isinstance(exc, Terminated) else 130


def stopped(exc: BaseException, resume_command: str) -> RunStopped:
    """A sweep cut off by the machine or a signal, and the command that continues it."""
    if isinstance(exc, MachineFailure):
        return RunStopped(f"{exc.cause}; {exc.fix}, then: {resume_command}", exc.exit_code)
    return RunStopped(f"interrupted; finished trials are kept, continue with: {resume_command}", signal_exit_code(exc))


def load_specs(paths: list[Path], overrides: list[str], flags: dict[str, str]) -> list[Config]:
    """Every spec validated before anything runs; the problems of all of them reported together."""

    configs, problems = [], []
    for path in paths:
        try:
            configs.append(load(path, overrides, flags))
        except FmnistError as exc:
            problems.append(str(exc))
    if problems:
        raise FmnistError("\n".join(problems))
    from fmnist_hpo.search.plan import check_distinct_experiments  # torch: only once the specs are sound

    check_distinct_experiments(list(zip(paths, configs, strict=True)))
    return configs


@dataclass(frozen=True)
class Finished:
    """The sweep of a single spec, run to its end now or before, and the store it is in."""

    result: SweepResult
    tracking_uri: str


def run_specs(cfgs: list[Config], mode: ResumeMode, quiet: bool, resume_command: str, ask: Ask) -> Finished | None:
    """One sweep, or several in order (where `resume` continues each); Ctrl-C and SIGTERM unwind it.
    The sweep of a single spec is returned (its best trial is what `--register` registers)."""
    from fmnist_hpo.search.interrupts import stop_on_signals

    try:
        with stop_on_signals():  # from the start: a signal during store creation lands cleanly too
            if len(cfgs) == 1:
                return run_one(cfgs[0], mode, quiet, resume_command, ask)
            run_several(cfgs, ResumeMode.CONTINUE if mode == ResumeMode.RESUME else mode, quiet, resume_command, ask)
            return None
    except (KeyboardInterrupt, Terminated) as exc:  # the sweep had not started: nothing to resume
        raise RunStopped("interrupted before the sweep started", signal_exit_code(exc)) from None


def run_one(cfg: Config, mode: ResumeMode, quiet: bool, resume_command: str, ask: Ask) -> Finished:
    from fmnist_hpo.search.progress import console, preparing, results_table

    with preparing("checking the device, the data and the store", show_spinner=not quiet):
        from fmnist_hpo.search.preflight import preflight

        resolved = preflight(cfg)
        from fmnist_hpo.search.plan import finished_before
        from fmnist_hpo.search.sweep import SweepFailed, run_from_config
    if not quiet:
        print(f"{cfg.experiment}: {'; '.join(resolved.describe())}", flush=True)
    earlier = finished_before(cfg) if mode == ResumeMode.ASK else None  # like several specs: not retrained silently
    if earlier is not None:
        print(f"{cfg.experiment}: finished before (sweep {earlier.parent_run_id}); --fresh to rerun", flush=True)
    try:
        with preparing("loading the data and opening the store", not quiet) as ready:
            result = earlier or run_from_config(cfg, resolved=resolved, show_bars=False if quiet else None, mode=mode,
                                                ask=ask, on_ready=ready)
    except SweepFailed as exc:
        console.print(results_table(exc.result))
        raise RunStopped(str(exc), 1) from None
    except (MachineFailure, KeyboardInterrupt, Terminated) as exc:
        raise stopped(exc, resume_command) from None
    from rich.console import Console

    Console(width=None if sys.stdout.isatty() else 120).print(results_table(result))
    best = result.best
    print(selected_line(result), flush=True)
    print(f"runs of {result.experiment} are in {resolved.tracking_uri}; "
          f"best checkpoint: {best.checkpoint or 'none written'}", flush=True)
    return Finished(result, resolved.tracking_uri)


def run_several(cfgs: list[Config], mode: ResumeMode, quiet: bool, resume_command: str, ask: Ask) -> None:
    """Each spec in order into its own experiment; a closing table with a row per experiment."""
    from rich.console import Console

    from fmnist_hpo.search.plan import run_spec
    from fmnist_hpo.search.preflight import preflight
    from fmnist_hpo.search.progress import preparing, study_table

    with preparing("checking the device, the data and the stores", show_spinner=not quiet):
        resolved = [preflight(cfg) for cfg in cfgs]  # every machine check before anything runs
    outcomes = []
    try:
        for cfg, where in zip(cfgs, resolved, strict=True):
            if not quiet:
                print(f"{cfg.experiment}: {'; '.join(where.describe())}", flush=True)
            with preparing("loading the data and opening the store", not quiet) as ready:
                outcomes.append(run_spec(cfg, where, mode, ask, False if quiet else None, ready))
    except MachineFailure as exc:
        raise stopped(exc, resume_command) from None
    except (KeyboardInterrupt, Terminated) as exc:
        if outcomes:
            Console(stderr=True).print(study_table(outcomes))
        raise stopped(exc, resume_command) from None
    Console(width=None if sys.stdout.isatty() else 120).print(study_table(outcomes))
    failed = [o.experiment for o in outcomes if o.status == SpecStatus.FAILED]
    if failed:
        raise RunStopped(f"every trial failed in: {', '.join(failed)}", 1)


def selected_line(result: SweepResult) -> str:
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


def print_estimates(cfgs: list[Config]) -> None:
    """Planned runs and epochs per experiment, and a wall-time estimate from a short timing probe."""
    import torch

    from fmnist_hpo.search.plan import SWEEP_FIXED_SECONDS, duration, estimate
    from fmnist_hpo.search.preflight import preflight

    resolved = [preflight(cfg) for cfg in cfgs]
    cache: dict = {}
    estimates = [estimate(cfg, torch.device(where.device), cache,
                          on_probe=lambda text: print(f"# {text} ...", file=sys.stderr, flush=True))
                 for cfg, where in zip(cfgs, resolved, strict=True)]
    devices = ", ".join(dict.fromkeys(where.device for where in resolved))
    print(f"\n# rough estimate on {devices}, from a short timing probe of each model: every epoch run (early "
          "stopping and pruning only shorten it), plus per run its test pass, warm-up and logging, and "
          f"~{SWEEP_FIXED_SECONDS:.0f} s per experiment to start; a busy machine takes longer", flush=True)
    for e in estimates:
        print(f"#   {e.experiment}: {e.runs} run(s) x up to {e.epochs} epoch(s), {e.epoch_seconds:.1f} s/epoch "
              f"+ {e.fixed_seconds:.1f} s per run: about {duration(e.total_seconds)}", flush=True)
    print(f"#   total: about {duration(sum(e.total_seconds for e in estimates))}", flush=True)
