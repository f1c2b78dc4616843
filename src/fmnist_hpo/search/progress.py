"""What a user sees while a sweep runs: log lines, live bars on a terminal, a closing table."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from loguru import logger
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fmnist_hpo.records import TrialStatus

if TYPE_CHECKING:
    from fmnist_hpo.records import EpochMetrics, SpecOutcome, SweepResult, TrialRecord

console = Console(stderr=True)


def configure_logging(verbosity: int) -> None:
    """-1 quiet (warnings only), 0 normal, 1 verbose (one line per epoch)."""
    level = {-1: "WARNING", 0: "INFO", 1: "DEBUG"}[max(-1, min(1, verbosity))]
    logger.remove()
    logger.add(lambda msg: console.print(msg, end="", markup=False, highlight=False, soft_wrap=True),
               level=level, format="{time:HH:mm:ss} {level: <7} {message}")
    package_log = logging.getLogger("fmnist_hpo")  # the training modules log through the standard library
    package_log.handlers = [_ToLoguru()]
    package_log.propagate = False


class _ToLoguru(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        logger.log(record.levelname, record.getMessage())


@contextlib.contextmanager
def preparing(what: str, show_spinner: bool = True) -> Iterator[Callable[[], None]]:
    """A transient 'preparing…' spinner on stderr while a run gets ready, where stderr is a terminal;
    it yields a function that stops it early (before the first trial's bars). Elsewhere it shows
    nothing, so that input rejected meanwhile still reads as one line on stderr."""
    if not (show_spinner and console.is_terminal):
        yield lambda: None
        return
    status = console.status(f"preparing: {what}…", spinner="dots")
    status.start()
    try:
        yield status.stop
    finally:
        status.stop()


class SweepProgress:
    """Bars for trials and epochs when stderr is a terminal and not quiet; log lines always."""

    def __init__(self, total_trials: int, epochs: int, show_bars: bool | None = None) -> None:
        self.epochs = epochs
        self.show_bars = sys.stderr.isatty() if show_bars is None else show_bars
        self.progress: Progress | None = None
        if self.show_bars:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                                     console=console, transient=True)
            self.trials_bar = self.progress.add_task("trials", total=total_trials, status="")
            self.epochs_bar = self.progress.add_task("epochs", total=epochs, status="")

    def __enter__(self) -> SweepProgress:
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress:
            self.progress.stop()

    def skip(self, done: int) -> None:
        """Count trials finished before a resume."""
        if done:
            logger.info(f"continuing the sweep: {done} trial(s) already done")
        if self.progress and done:
            self.progress.update(self.trials_bar, advance=done)

    def trial_started(self, number: int, values: dict[str, Any]) -> None:
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in values.items()) or "base config"
        logger.info(f"trial {number}: {shown}")
        if self.progress:
            self.progress.reset(self.epochs_bar, total=self.epochs, status="")
            self.progress.update(self.epochs_bar, description=f"trial {number}")

    def steps_done(self, epoch: int, done: int, total: int) -> None:
        """Within epoch (0-based): the epochs bar moves with the steps, not only when an epoch ends."""
        if self.progress:
            self.progress.update(self.epochs_bar, completed=epoch + done / total, status=f"step {done}/{total}")

    def epoch_done(self, number: int, m: EpochMetrics) -> None:
        logger.debug(f"trial {number} epoch {m.epoch + 1}: train_loss={m.train_loss:.4f} "
                     f"val_loss={m.val_loss:.4f} val_acc={m.val_accuracy:.4f} ({m.epoch_seconds:.1f}s)")
        if self.progress:
            self.progress.update(self.epochs_bar, completed=m.epoch + 1, status=f"val_acc {m.val_accuracy:.4f}")

    def trial_done(self, record: TrialRecord) -> None:
        if record.status == TrialStatus.OK:
            pruned = f", pruned after epoch {record.pruned_at}" if record.pruned_at is not None else ""
            logger.info(f"trial {record.number} done: val_acc={record.kept_val_accuracy:.4f} "
                        f"test_acc={record.test_accuracy:.4f} epochs={record.epochs_run} "
                        f"({record.trial_seconds:.1f}s{pruned})")
        else:
            logger.warning(f"trial {record.number} failed: {record.reason}")
        if self.progress:
            self.progress.update(self.trials_bar, advance=1)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _short_name(key: str, keys: list[str]) -> str:
    """'model.filters' -> 'filters' unless another key ends the same way."""
    last = key.rsplit(".", 1)[-1]
    return last if sum(k.rsplit(".", 1)[-1] == last for k in keys) == 1 else key


def results_table(result: SweepResult) -> Table:
    keys = list(dict.fromkeys(k for t in result.trials for k in t.values))
    table = Table(title=f"{result.experiment}: {len(result.finished)} finished, {len(result.failed)} failed")
    table.add_column("trial", justify="right")
    for key in keys:
        table.add_column(_short_name(key, keys), justify="right")
    for name in ("val acc", "test acc", "epochs", "time (s)", "status"):
        table.add_column(name, justify="right")
    best_id = result.best.run_id if result.best else None
    for t in sorted(result.trials, key=lambda t: t.number):  # parallel trials finish out of order
        mark = "*" if t.run_id == best_id else ""
        ok = t.status == TrialStatus.OK
        table.add_row(
            f"{t.number}{mark}",
            *(_fmt(t.values.get(k, "")) for k in keys),
            f"{t.kept_val_accuracy:.4f}" if ok and t.kept_val_accuracy == t.kept_val_accuracy else "-",
            f"{t.test_accuracy:.4f}" if ok and t.test_accuracy == t.test_accuracy else "-",
            str(t.epochs_run) if ok else "-",
            f"{t.trial_seconds:.1f}" if ok else "-",
            (f"pruned@{t.pruned_at}" if t.pruned_at is not None else "ok") if ok else f"failed: {t.reason}"[:60],
            style="bold green" if mark else None,
        )
    return table


def study_table(outcomes: list[SpecOutcome]) -> Table:
    """One row per experiment of a multi-spec run: what happened and what its sweep selected."""
    table = Table(title=f"{len(outcomes)} experiment(s)")
    for name in ("experiment", "status", "trials", "failed", "val acc", "test acc", "time"):
        table.add_column(name, justify="left" if name in ("experiment", "status") else "right")
    for outcome in outcomes:
        result = outcome.result
        chosen = result.selection if result else None
        val = chosen.mean(lambda t: t.kept_val_accuracy) if chosen else math.nan
        test = chosen.mean(lambda t: t.test_accuracy) if chosen else math.nan
        table.add_row(outcome.experiment, outcome.status, str(len(result.finished) if result else 0),
                      str(len(result.failed) if result else 0), "-" if val != val else f"{val:.4f}",
                      "-" if test != test else f"{test:.4f}", f"{outcome.seconds:.0f} s" if outcome.seconds else "-")
    return table
