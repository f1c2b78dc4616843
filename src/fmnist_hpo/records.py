"""Plain records of a sweep: per-epoch metrics, a trial as the sweep runs it, a trial as it is stored.

These are the names every part of the tool uses. A trial's figures are those of its kept epoch
(selection.py): `kept_val_accuracy`, `kept_val_loss`, `kept_train_accuracy` and `kept_epoch`; its test
figures (`test_accuracy`, `test_loss`) were scored once, on that epoch's weights.

Epochs a user reads are numbered from 1 (`kept_epoch`, `pruned_at_epoch`); EpochMetrics.epoch and
MLflow's step are 0-based indices (epoch N is step N-1). A trial's total time is `trial_seconds`;
`train_seconds` is only ever the training part of one epoch. Stores written before either rule are
read back under it (LoggedTrial.__post_init__, tracking.reader.logged_trial).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from fmnist_hpo.files import checkpoint_file
from fmnist_hpo.selection import Selection, objective, select
from fmnist_hpo.tags import (
    FAILURE_REASON,
    KEPT_EPOCH,
    PARENT,
    PRUNED,
    PRUNED_AT_EPOCH,
    RECORD_VERSION,
    RunStatus,
    flagged,
)

EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds")
# what a trial's run logs at its end: the kept epoch's figures, its test score, its size and time
FINAL_METRICS = ("kept_epoch", "kept_train_accuracy", "kept_val_accuracy", "kept_val_loss", "test_accuracy",
                 "test_loss", "total_parameters", "trial_seconds", "epochs_run")
TRIAL_SECONDS = "trial_seconds"  # the trial's epochs end to end (training, validation, the loop's work), summed
EPOCH_TIMINGS = ("train_seconds", "eval_seconds")  # logged since they were measured apart; older runs lack them
# metric names of stores written before the kept epoch had one definition
_LEGACY_NAMES = {"best_val_accuracy": "kept_val_accuracy", "best_val_loss": "kept_val_loss",
                 "best_train_accuracy": "kept_train_accuracy"}


class TrialStatus(StrEnum):
    """How a trial of the running sweep ended (its run's MLflow status says more: RunStatus)."""

    OK = "ok"
    FAILED = "failed"


class SpecStatus(StrEnum):
    """What happened to one spec of a multi-spec run."""

    FINISHED = "finished"
    DONE_BEFORE = "done before"
    FAILED = "failed"


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float
    epoch_seconds: float  # the whole epoch: training, validation and the loop's own work
    train_seconds: float = math.nan  # nan: not recorded (histories written before these existed)
    eval_seconds: float = math.nan

    @property
    def overhead_seconds(self) -> float:
        """What the epoch spent outside training and validation."""
        return self.epoch_seconds - self.train_seconds - self.eval_seconds

    def as_dict(self) -> dict[str, float]:
        """The logged metrics, with the overhead; timings that were not recorded are left out."""
        values = {k: v for k, v in self.__dict__.items() if k != "epoch"}
        values["overhead_seconds"] = self.overhead_seconds
        return {k: v for k, v in values.items() if not (k.endswith("_seconds") and math.isnan(v))}


@dataclass
class TrialRecord:
    """A trial of the running sweep; `point` numbers its configuration, `repeat` its seed."""

    number: int
    run_id: str
    values: dict[str, Any]
    point: int = 0
    repeat: int = 0
    status: TrialStatus = TrialStatus.OK
    reason: str | None = None
    kept_epoch: int = 0  # 1-based; 0: none
    kept_train_accuracy: float = math.nan
    kept_val_accuracy: float = math.nan
    kept_val_loss: float = math.nan
    test_accuracy: float = math.nan
    test_loss: float = math.nan
    epochs_run: int = 0
    trial_seconds: float = 0.0
    total_parameters: int = 0
    pruned_at: int | None = None  # 1-based: the last epoch it ran before a pruner stopped it
    checkpoint: Path | None = None

    @property
    def config_key(self) -> int:
        return self.point

    def eligible(self) -> bool:
        """Whether selection may pick it: finished, not pruned, tested (so it has a checkpoint)."""
        return self.status == TrialStatus.OK and self.pruned_at is None and math.isfinite(self.test_accuracy)

    def objective(self, metric: str) -> float:
        return objective(metric, self.kept_val_loss, self.kept_val_accuracy)

    def keep(self, kept: EpochMetrics, history: list[EpochMetrics]) -> None:
        """Take the figures of the kept epoch out of the trial's history."""
        self.kept_epoch = kept.epoch + 1
        self.kept_train_accuracy, self.kept_val_accuracy, self.kept_val_loss = (
            kept.train_accuracy, kept.val_accuracy, kept.val_loss)
        self.epochs_run = len(history)
        self.trial_seconds = sum(m.epoch_seconds for m in history)

    def final_metrics(self) -> dict[str, float]:
        """What the trial's run logs at its end (NaN, for figures it does not have, left out)."""
        values = {key: getattr(self, key) for key in FINAL_METRICS}
        return {k: v for k, v in values.items() if math.isfinite(v) and not (k == KEPT_EPOCH and v < 1)}

    @classmethod
    def from_logged(cls, trial: LoggedTrial, models_dir: Path) -> TrialRecord:
        m = trial.metrics
        return cls(
            number=trial.number, run_id=trial.run_id, values=trial.values, point=trial.point, repeat=trial.repeat,
            status=TrialStatus.OK if trial.status == RunStatus.FINISHED else TrialStatus.FAILED,
            reason=trial.tags.get(FAILURE_REASON),
            kept_epoch=int(m.get(KEPT_EPOCH, 0)), kept_train_accuracy=m.get("kept_train_accuracy", math.nan),
            kept_val_accuracy=m.get("kept_val_accuracy", math.nan), kept_val_loss=m.get("kept_val_loss", math.nan),
            test_accuracy=m.get("test_accuracy", math.nan), test_loss=m.get("test_loss", math.nan),
            epochs_run=int(m.get("epochs_run", 0)), trial_seconds=m.get(TRIAL_SECONDS, 0.0),
            total_parameters=int(m.get("total_parameters", 0)), checkpoint=checkpoint_file(models_dir, trial.run_id),
            pruned_at=int(trial.tags[PRUNED_AT_EPOCH]) if PRUNED_AT_EPOCH in trial.tags else None,
        )


@dataclass
class SweepResult:
    experiment: str
    parent_run_id: str
    metric: str
    trials: list[TrialRecord] = field(default_factory=list)
    note: str | None = None  # why the search ended early (every point of a small space done, say)

    @property
    def finished(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.status == TrialStatus.OK]

    @property
    def failed(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.status != TrialStatus.OK]

    @property
    def selection(self) -> Selection | None:
        return select(self.trials, self.metric)

    @property
    def best(self) -> TrialRecord | None:
        """The run that stands for the selected configuration (its best repeat on validation)."""
        chosen = self.selection
        return chosen.representative if chosen else None

    def runs_of(self, point: int) -> dict[int, TrialRecord]:
        return {t.repeat: t for t in self.trials if t.point == point}


@dataclass
class SpecOutcome:
    """One spec of a multi-spec run: what happened to it and its sweep's result."""

    experiment: str
    status: SpecStatus
    result: SweepResult | None
    seconds: float = 0.0


@dataclass
class LoggedTrial:
    """One trial run as read back from MLflow: plain values, no MLflow types."""

    run_id: str
    experiment: str
    number: int
    point: int
    repeat: int
    status: str  # MLflow's: a RunStatus
    values: dict[str, Any]  # the sampled values of this trial
    metrics: dict[str, float]
    params: dict[str, str]
    tags: dict[str, str]
    data_digest: str | None = None  # of the IDX files, from the run's dataset inputs (None: not recorded)

    def __post_init__(self) -> None:
        for old, new in _LEGACY_NAMES.items():
            if old in self.metrics and new not in self.metrics:
                self.metrics[new] = self.metrics.pop(old)
        if self.is_legacy_record:  # epochs were counted from 0
            if KEPT_EPOCH in self.metrics:
                self.metrics[KEPT_EPOCH] += 1
            for tag in (KEPT_EPOCH, PRUNED_AT_EPOCH):
                if self.tags.get(tag, "").lstrip("-").isdigit():
                    self.tags[tag] = str(int(self.tags[tag]) + 1)

    @property
    def is_legacy_record(self) -> bool:
        """A finished trial written before the record version tag (0-based epochs, no trial_seconds)."""
        return RECORD_VERSION not in self.tags and KEPT_EPOCH in {*self.metrics, *self.tags}

    @property
    def kept_epoch(self) -> int:
        """The kept epoch, counted from 1; 0 where the run has none."""
        return int(self.metrics.get(KEPT_EPOCH, 0))

    @property
    def trial_seconds(self) -> float:
        return self.metrics.get(TRIAL_SECONDS, math.nan)

    @property
    def config_key(self) -> tuple[str, int]:
        """Runs of one configuration: the same point of the same sweep."""
        return self.tags.get(PARENT, ""), self.point

    @property
    def search_metric(self) -> str:
        return self.params.get("search.metric", "val_accuracy")

    def eligible(self) -> bool:
        return (self.status == RunStatus.FINISHED and not flagged(self.tags, PRUNED)
                and {"kept_val_accuracy", "kept_val_loss", "test_accuracy"} <= set(self.metrics))

    def objective(self, metric: str) -> float:
        return objective(metric, self.metrics.get("kept_val_loss", math.nan),
                         self.metrics.get("kept_val_accuracy", math.nan))
