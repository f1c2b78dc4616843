"""The words on an MLflow run: every tag name fmnist writes or reads, the roles and MLflow's statuses.

A run's tags are a string contract between the sweep that writes them (search.trial_runs) and every
reader (resume, analysis, verify, the records read back), so each name is spelled here once. It is a
root module because records.py reads tags too, and root modules import only each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum


class Role(StrEnum):
    """What a run is to fmnist (the ROLE tag): a sweep's parent run, or one of its trials."""

    SWEEP = "sweep"
    TRIAL = "trial"


class RunStatus(StrEnum):
    """MLflow's own run statuses, under names."""

    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    KILLED = "KILLED"


class ModelStatus(StrEnum):
    """MLflow's own statuses of a LoggedModel."""

    PENDING = "PENDING"
    READY = "READY"
    FAILED = "FAILED"


UNFINISHED = (RunStatus.RUNNING, RunStatus.KILLED)  # left RUNNING by a crash, KILLED by an interrupt

# MLflow's own tag names
PARENT = "mlflow.parentRunId"
NOTE = "mlflow.note.content"
EXPERIMENT_KIND = "mlflow.experimentKind"  # an experiment's tag
DATA_CONTEXT = "mlflow.data.context"  # a dataset input's tag: train, validation or test

# every run
ROLE = "fmnist.role"
CONFIG_HASH = "config_hash"
DEVICE = "device"
HOST = "host"
TORCH_VERSION = "torch_version"
PYTHON_VERSION = "python_version"
GIT_COMMIT = "git_commit"

# a sweep's parent run
SWEEP_ID = "sweep_id"
PID = "pid"  # with HOST: the process driving the sweep
SEARCH_NOTE = "search_note"
ABANDONED = "abandoned"
SELECTED_RUN_ID = "selected_run_id"
SELECTED_TRIAL = "selected_trial"
SELECTED_RUNS = "selected_runs"
SELECTED_VALUES = "selected_values"

# a trial's run
TRIAL = "trial"
POINT = "point"
REPEAT = "repeat"
PRECISION = "precision"
SAMPLED = "sampled"
RAY_TRIAL_ID = "ray_trial_id"
RESUMED = "resumed"
WALL_SECONDS = "wall_seconds"
KEPT_EPOCH = "kept_epoch"  # 1-based, as a tag and as a metric
PRUNED = "pruned"  # a flag
PRUNED_AT_EPOCH = "pruned_at_epoch"
INTERRUPTED = "interrupted"  # a flag: cut off, closed FAILED, its configuration run again
FAILURE_REASON = "failure_reason"
CHECKPOINT_LOST = "checkpoint_lost"
MODEL_URI = "model_uri"
# a finished trial's run carries it from the record version on which kept_epoch counts from 1 and
# trial_seconds exists; runs without it are older and are read back under the new rules
RECORD_VERSION = "fmnist.record_version"
CURRENT_RECORD_VERSION = "2"

TRUE = "true"  # the value of a set flag
_ABANDONED = "abandoned: "  # how the FAILURE_REASON of a run closed by an abandoned sweep begins


def flagged(run_tags: Mapping[str, str], name: str) -> bool:
    """Whether a flag tag (PRUNED, INTERRUPTED) is set."""
    return run_tags.get(name) == TRUE


def abandoned_because(why: str) -> str:
    """The reason an interrupted sweep (and its runs) gets when it will not be continued."""
    return _ABANDONED + why


def was_abandoned(run_tags: Mapping[str, str]) -> bool:
    """Whether the run was closed because its interrupted sweep was abandoned, not by its own failure."""
    return run_tags.get(FAILURE_REASON, "").startswith(_ABANDONED)
