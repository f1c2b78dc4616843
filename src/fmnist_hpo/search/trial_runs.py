"""The MLflow runs of a sweep, written alike by both engines: one parent run, one nested run per trial.

Only the process that drives the sweep writes through this class, so one SQLite file never has two
writers. A trial's run opens when it starts, gets one metric row per epoch and closes with the kept
epoch's figures, its test score and its checkpoint; the parent closes with the selected configuration.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fmnist_hpo.config.loading import apply_overrides, config_hash, dump_yaml, flatten, hash_of, to_dict
from fmnist_hpo.config.sections import Config
from fmnist_hpo.data.loading import Dataset
from fmnist_hpo.data.splits import split_indices
from fmnist_hpo.errors import DataError, FmnistError, MachineFailure
from fmnist_hpo.files import checkpoint_file, models_folder
from fmnist_hpo.milestones import reached
from fmnist_hpo.records import EpochMetrics, LoggedTrial, SweepResult, TrialRecord, TrialStatus
from fmnist_hpo.tags import (
    CHECKPOINT_LOST,
    CONFIG_HASH,
    CURRENT_RECORD_VERSION,
    DEVICE,
    FAILURE_REASON,
    HOST,
    INTERRUPTED,
    KEPT_EPOCH,
    NOTE,
    PID,
    POINT,
    PRECISION,
    PRUNED,
    PRUNED_AT_EPOCH,
    RECORD_VERSION,
    REPEAT,
    RESUMED,
    ROLE,
    SAMPLED,
    SELECTED_RUN_ID,
    SELECTED_RUNS,
    SELECTED_TRIAL,
    SELECTED_VALUES,
    SWEEP_ID,
    TRIAL,
    TRUE,
    Role,
    RunStatus,
)
from fmnist_hpo.tracking.store import TrackingError
from fmnist_hpo.tracking.writer import Tracker


def process_tags() -> dict[str, str]:
    """Which process drives a sweep: a resume refuses to take over one that is still alive."""
    return {PID: str(os.getpid()), HOST: os.uname().nodename}


def sweep_id(cfg: Config) -> str:
    """The identity of a sweep: its config without what may change between a run and its resume."""
    raw = to_dict(cfg)
    raw["search"].pop("max_evals")
    raw.pop("mlflow")
    raw.pop("description")
    return hash_of(raw)


def trial_config(cfg: Config, values: dict[str, Any], repeat: int) -> dict[str, Any]:
    """The raw config of one trial: the sweep's, with the sampled values and the repeat's seed."""
    overrides = {**values, "train.seed": cfg.train.seed + repeat} if repeat else values
    return apply_overrides(to_dict(cfg), overrides)


@dataclass(frozen=True)
class Lineage:
    """Where a sweep's images come from, for MLflow's dataset tracking of every trial."""

    dataset: Dataset
    source: str  # the data folder
    digest: str  # of the four IDX files' contents


class SweepRuns:
    """Opens, feeds and closes the runs of one sweep; knows which are open, to close them on an interrupt."""

    def __init__(self, cfg: Config, tracker: Tracker, device: str, lineage: Lineage | None = None) -> None:
        self.cfg = cfg
        self.tracker = tracker
        self.device = device
        self.lineage = lineage
        self.models_dir = models_folder(cfg.models_dir, cfg.experiment)
        self.parent_id = ""
        self.open: dict[str, TrialRecord] = {}
        self._next_number = 0

    # --- the parent -------------------------------------------------------------------------

    def start_parent(self) -> str:
        cfg = self.cfg
        self.parent_id = self.tracker.start_run(
            f"sweep-{config_hash(cfg)}",
            params=flatten(to_dict(cfg)),
            tags={ROLE: Role.SWEEP, SWEEP_ID: sweep_id(cfg), CONFIG_HASH: config_hash(cfg),
                  DEVICE: self.device, NOTE: cfg.description, **process_tags()},
        )
        self.tracker.log_text(self.parent_id, dump_yaml(cfg), "config.yaml")
        return self.parent_id

    def continue_parent(self, parent_id: str) -> list[LoggedTrial]:
        """Reopen an interrupted sweep; returns its trial runs. Their numbers stay taken."""
        self.parent_id = parent_id
        self.tracker.reopen(parent_id, process_tags())
        logged = self.tracker.trials_of(parent_id)
        self._next_number = 1 + max((t.number for t in logged), default=-1)
        return logged

    def finish_parent(self, result: SweepResult) -> None:
        """Close the sweep with the selected configuration: its runs' mean figures, its representative run."""
        chosen = result.selection
        self.tracker.log_metrics(self.parent_id, {
            "trials_finished": len(result.finished), "trials_failed": len(result.failed),
            "configurations": len({t.point for t in result.trials})})
        if chosen is None:
            self.tracker.end_run(self.parent_id, RunStatus.FAILED)
            return
        best = chosen.representative
        if self.cfg.mlflow.log_model == "best":
            self.log_model(best)
        self.tracker.set_tags(self.parent_id, {
            SELECTED_RUN_ID: best.run_id, SELECTED_TRIAL: best.number, SELECTED_RUNS: len(chosen.runs),
            SELECTED_VALUES: yaml.safe_dump(best.values, sort_keys=False).strip()})
        figures = {}
        for key in ("kept_val_accuracy", "kept_val_loss", "test_accuracy", "test_loss"):
            name = "selected_" + key.removeprefix("kept_")
            figures[name] = chosen.mean(lambda t, key=key: getattr(t, key))
            if len(chosen.runs) > 1:
                figures[f"{name}_std"] = chosen.std(lambda t, key=key: getattr(t, key))
        self.tracker.log_metrics(self.parent_id, {k: v for k, v in figures.items() if math.isfinite(v)})
        self.tracker.end_run(self.parent_id, RunStatus.FINISHED)

    def kill_open(self) -> None:
        """Ctrl-C, SIGTERM or a crash of the driver: every run still open, and the sweep, become KILLED.

        With the store gone (a tracking server that died, a full disk) they stay RUNNING, which a resume handles.
        """
        with contextlib.suppress(TrackingError, MachineFailure):
            for run_id in list(self.open):
                self.tracker.end_run(run_id, RunStatus.KILLED)
            if self.parent_id:
                self.tracker.end_run(self.parent_id, RunStatus.KILLED)
        self.open.clear()

    # --- trials -----------------------------------------------------------------------------

    def open_trial(self, point: int | None, values: dict[str, Any], repeat: int = 0,
                   tags: dict[str, str] | None = None) -> TrialRecord:
        """A new trial run; point None numbers the configuration like the trial (the Ray engine's case)."""
        number = self._next_number
        self._next_number += 1
        point = number if point is None else point
        raw = trial_config(self.cfg, values, repeat)
        run_id = self.tracker.start_run(
            f"trial-{number:03d}", params=flatten(raw),
            tags={ROLE: Role.TRIAL, TRIAL: str(number), POINT: str(point), REPEAT: str(repeat),
                  DEVICE: self.device, **self._precision_tag(raw["train"]["precision"]),
                  SAMPLED: yaml.safe_dump(values, sort_keys=False).strip(), **(tags or {})},
            parent_id=self.parent_id,
        )
        self._log_inputs(run_id, raw["data"])
        record = self.open[run_id] = TrialRecord(number, run_id, values, point, repeat)
        return record

    def _precision_tag(self, precision: Any) -> dict[str, str]:
        """What the trial computes in here, `auto` resolved: what a reader re-scores its checkpoint in."""
        import torch

        from fmnist_hpo.training.device import precision_name

        try:
            return {PRECISION: precision_name(precision, torch.device(self.device))}
        except (FmnistError, KeyError, TypeError):
            return {}  # an invalid sampled point: the trial fails with the reason

    def _log_inputs(self, run_id: str, data: dict[str, Any]) -> None:
        """The trial's train, validation and test sets in MLflow's dataset tracking."""
        if self.lineage is None:
            return
        try:
            train, val = split_indices(self.lineage.dataset, data["val_size"], data["split_seed"], data["train_subset"])
        except (DataError, TypeError, ValueError):
            return  # an invalid sampled point: the trial fails with the reason, with nothing to record
        sizes = {"train": len(train), "validation": len(val), "test": len(self.lineage.dataset.test_labels)}
        self.tracker.log_datasets(run_id, self.lineage.dataset.info.name, self.lineage.digest, self.lineage.source,
                                  data["split_seed"], sizes)

    def reopen_trial(self, logged: LoggedTrial) -> TrialRecord:
        """An interrupted trial, to continue from its last saved epoch in its own run."""
        self.tracker.reopen(logged.run_id, {RESUMED: "after an interruption"})
        record = self.open[logged.run_id] = TrialRecord(logged.number, logged.run_id, logged.values,
                                                        logged.point, logged.repeat)
        return record

    def describe_trial(self, record: TrialRecord, trial_cfg: Config) -> None:
        self.tracker.set_tags(record.run_id, {CONFIG_HASH: config_hash(trial_cfg)})
        self.tracker.log_text(record.run_id, dump_yaml(trial_cfg), "config.yaml")

    def log_epoch(self, record: TrialRecord, metrics: EpochMetrics) -> None:
        self.tracker.log_metrics(record.run_id, metrics.as_dict(), step=metrics.epoch)

    def log_bookkeeping(self, record: TrialRecord, epoch: int, seconds: float) -> None:
        """Time an epoch spent outside training and validation: MLflow logging, progress, the state file."""
        self.tracker.log_metrics(record.run_id, {"bookkeeping_seconds": seconds}, step=epoch)

    def checkpoint_path(self, record: TrialRecord) -> Path:
        return checkpoint_file(self.models_dir, record.run_id)

    def close_finished(self, record: TrialRecord) -> None:
        """A trial that trained (to the end, or until pruned): its checkpoint, figures and tags; FINISHED."""
        if record.checkpoint is not None:
            self.tracker.log_file(record.run_id, record.checkpoint, "checkpoint")
        tags: dict[str, Any] = {KEPT_EPOCH: record.kept_epoch, RECORD_VERSION: CURRENT_RECORD_VERSION}
        if record.pruned_at is not None:
            tags.update({PRUNED: TRUE, PRUNED_AT_EPOCH: record.pruned_at})
        self.tracker.set_tags(record.run_id, tags)
        self.tracker.log_metrics(record.run_id, {**record.final_metrics(), **self._time_to_accuracy(record)})
        if self.cfg.mlflow.log_model == "all" and record.checkpoint is not None:
            self.log_model(record)
        self._close(record, RunStatus.FINISHED)

    def _time_to_accuracy(self, record: TrialRecord) -> dict[str, float]:
        """Read from the logged epochs, so a resumed trial counts the epochs before its interruption too."""
        return reached(self.tracker.history(record.run_id), self.cfg.mlflow.time_to_accuracy)

    def close_cut_off(self, logged: LoggedTrial) -> None:
        """A Ray trial cut off by an interruption: closed FAILED and tagged; its configuration runs again."""
        self.tracker.set_tags(logged.run_id, {INTERRUPTED: TRUE,
                                              FAILURE_REASON: "interrupted; its configuration is run again"})
        self.tracker.end_run(logged.run_id, RunStatus.FAILED)

    def close_failed(self, record: TrialRecord, reason: str, tags: dict[str, str] | None = None) -> None:
        record.status, record.reason = TrialStatus.FAILED, reason
        self.tracker.set_tags(record.run_id, {FAILURE_REASON: reason, **(tags or {})})
        self._close(record, RunStatus.FAILED)

    def _close(self, record: TrialRecord, status: RunStatus) -> None:
        self.tracker.end_run(record.run_id, status)
        self.open.pop(record.run_id, None)

    def log_model(self, record: TrialRecord) -> str:
        from fmnist_hpo.tracking.registry import log_trial_model

        return log_trial_model(self.tracker, record.run_id, self.usable_checkpoint(record))

    def usable_checkpoint(self, record: TrialRecord) -> Path:
        """The trial's checkpoint, restored from its run's artifact copy if damaged; LostCheckpoint if it cannot be."""
        from fmnist_hpo.tracking.reader import download_checkpoint
        from fmnist_hpo.training.repair import usable_checkpoint

        return usable_checkpoint(record.checkpoint or self.checkpoint_path(record), record.run_id,
                                 lambda folder: download_checkpoint(self.tracker.tracking_uri, record.run_id, folder))

    def close_lost(self, record: TrialRecord, reason: str) -> None:
        """A finished trial whose checkpoint is gone for good: closed like a cut-off trial; its configuration runs again."""
        self.tracker.set_tags(record.run_id, {INTERRUPTED: TRUE, CHECKPOINT_LOST: reason,
                                              FAILURE_REASON: "its checkpoint was lost; its configuration is trained again"})
        self.tracker.end_run(record.run_id, RunStatus.FAILED)
