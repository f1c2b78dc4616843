"""Which interrupted sweep to continue, and what of it is done, to do, or to continue.

MLflow is the sweep's memory: every trial run carries its sampled values, its point (the index of
its configuration in the search) and its repeat, so an interrupted sweep is rebuilt from the store
and continued under the same parent. A trial writes its whole training state after every epoch,
so an interrupted trial continues from its last finished epoch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from fmnist_hpo.errors import FmnistError
from fmnist_hpo.records import LoggedTrial, TrialRecord
from fmnist_hpo.tags import FAILURE_REASON, INTERRUPTED, PID, RunStatus, abandoned_because, flagged

if TYPE_CHECKING:  # the CLI imports ResumeMode at start-up: nothing heavy at the top of this module
    from fmnist_hpo.config.sections import Config
    from fmnist_hpo.tracking.writer import Tracker


class ResumeMode(StrEnum):
    """What `fmnist run` does with an interrupted sweep of the same config."""

    ASK = "ask"  # ask on a terminal; with none to ask, continue it
    RESUME = "resume"  # continue it; an error when there is none
    CONTINUE = "continue"  # continue it, or start afresh where nothing was interrupted (several specs)
    FRESH = "fresh"  # start anew, closing the interrupted runs as FAILED


Ask = Callable[[str], bool] | None  # how to ask whether to continue an interrupted sweep; None: it continues


class ResumeError(FmnistError):
    """An earlier sweep cannot be continued as asked."""


@dataclass
class Reloaded:
    """An interrupted sweep as the store holds it."""

    done: list[TrialRecord] = field(default_factory=list)  # finished or failed: kept as they are
    interrupted: list[LoggedTrial] = field(default_factory=list)  # cut off: continued (or rerun on Ray)


def reload(logged: list[LoggedTrial], models_dir: Path) -> Reloaded:
    reloaded = Reloaded()
    for trial in logged:
        if flagged(trial.tags, INTERRUPTED):
            continue  # a Ray trial cut off by an earlier interruption, already closed and run again
        if trial.status == RunStatus.FINISHED or (trial.status == RunStatus.FAILED and FAILURE_REASON in trial.tags):
            reloaded.done.append(TrialRecord.from_logged(trial, models_dir))
        else:  # RUNNING after a crash, KILLED after Ctrl-C
            reloaded.interrupted.append(trial)
    return reloaded


def choose_parent(tracker: Tracker, cfg: Config, mode: ResumeMode, ask: Ask = None,
                  say: Callable[[str], None] = print) -> str | None:
    """The interrupted sweep to continue, or None for a fresh one (see ResumeMode).

    ASK asks through ask(question) -> bool. With no way to ask (stdin is not a terminal: nohup, CI,
    a scheduler) the safe choice wins: the interrupted sweep is continued, and say() tells so.
    """
    from fmnist_hpo.search.trial_runs import sweep_id
    from fmnist_hpo.tracking.provenance import alive_elsewhere

    candidates = tracker.unfinished_sweeps(sweep_id(cfg))
    if not candidates:
        if mode == ResumeMode.RESUME:
            raise ResumeError(f"no interrupted sweep of this config in experiment {cfg.experiment!r} to resume")
        return None
    mode = ResumeMode.RESUME if mode == ResumeMode.CONTINUE else mode
    parent = candidates[0]
    if alive_elsewhere(parent.tags):
        pid = parent.tags[PID]
        raise ResumeError(f"this sweep is still running (pid {pid} on this host); wait for it to finish, or stop it "
                          f"(kill {pid}) and run again to continue it")
    if mode == ResumeMode.ASK:
        if ask is None:
            say(f"continuing the interrupted sweep {parent.run_id} of this config "
                "(no terminal to ask; pass --fresh to start anew instead)")
            mode = ResumeMode.RESUME
        else:
            question = f"An interrupted sweep of this config exists (run {parent.run_id}). Continue it?"
            mode = ResumeMode.RESUME if ask(question) else ResumeMode.FRESH
    keep = parent.run_id if mode == ResumeMode.RESUME else None
    for stale in candidates:  # older interrupted copies (and, for --fresh, this one) are closed
        if stale.run_id != keep:
            tracker.abandon(stale.run_id, abandoned_because("a fresh sweep of the same config was started"
                                                            if keep is None else f"superseded by the resumed sweep {keep}"))
    return keep
