"""Stores written before the record rules of today are read back under them, through MLflow's client."""

from __future__ import annotations

from pathlib import Path

import pytest

from fmnist_hpo.analysis.analyze import summary_row
from fmnist_hpo.records import LoggedTrial, TrialRecord
from fmnist_hpo.tags import CURRENT_RECORD_VERSION, RECORD_VERSION
from fmnist_hpo.tracking.reader import RunReader
from fmnist_hpo.tracking.writer import Tracker

EPOCH_SECONDS = [7.0, 8.0, 9.0]


def log_old_style_trial(tracker: Tracker, parent: str) -> str:
    """A finished trial as the code before the record version tag wrote it."""
    run = tracker.start_run("trial-000", params={"search.metric": "val_accuracy"},
                            tags={"fmnist.role": "trial", "trial": "0", "point": "0", "repeat": "0", "sampled": "{}"},
                            parent_id=parent)
    for epoch, seconds in enumerate(EPOCH_SECONDS):
        tracker.log_metrics(run, {"val_loss": 0.5, "val_accuracy": 0.8 + epoch / 100, "train_loss": 0.5,
                                  "train_accuracy": 0.8, "lr": 0.001, "epoch_seconds": seconds,
                                  "train_seconds": seconds - 1}, step=epoch)
    # the trial's total went under the per-epoch key at step 0; kept_epoch counted from 0
    tracker.log_metrics(run, {"train_seconds": sum(EPOCH_SECONDS), "kept_epoch": 2, "kept_val_accuracy": 0.82,
                              "kept_val_loss": 0.5, "test_accuracy": 0.81, "test_loss": 0.5, "epochs_run": 3})
    tracker.set_tags(run, {"kept_epoch": 2, "pruned_at_epoch": 2})
    tracker.end_run(run)
    return run


@pytest.fixture
def old_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "old")
    parent = tracker.start_run("sweep", params={}, tags={"fmnist.role": "sweep"})
    log_old_style_trial(tracker, parent)
    tracker.end_run(parent)
    return uri


def test_an_old_trial_reads_with_its_total_time_and_epochs_counted_from_1(old_store: str):
    reader = RunReader(old_store)
    (trial,) = reader.trials("old")
    assert trial.metrics["train_seconds"] == EPOCH_SECONDS[-1] - 1  # what MLflow's latest value says: one epoch
    assert trial.trial_seconds == sum(EPOCH_SECONDS)
    assert trial.kept_epoch == 3 and trial.tags["kept_epoch"] == "3" and trial.tags["pruned_at_epoch"] == "3"
    assert summary_row("old", [trial])["median_trial_seconds"] == sum(EPOCH_SECONDS)


def test_a_resumed_sweep_reads_its_old_trials_the_same_way(old_store: str):
    tracker = Tracker(old_store, "old")
    (parent,) = tracker.client.search_runs([tracker.experiment_id], "tags.`fmnist.role` = 'sweep'")
    (logged,) = tracker.trials_of(parent.info.run_id)
    record = TrialRecord.from_logged(logged, Path("models/old"))
    assert (record.kept_epoch, record.trial_seconds, record.pruned_at) == (3, sum(EPOCH_SECONDS), 3)


def test_a_current_trial_is_read_as_written():
    record = TrialRecord(0, "r", {}, kept_epoch=2, kept_val_accuracy=0.9, kept_val_loss=0.3, test_accuracy=0.9,
                         trial_seconds=5.0, epochs_run=3)
    logged = LoggedTrial("r", "e", 0, 0, 0, "FINISHED", {}, record.final_metrics(),
                         {}, {"kept_epoch": "2", RECORD_VERSION: CURRENT_RECORD_VERSION})
    assert (logged.kept_epoch, logged.trial_seconds, logged.tags["kept_epoch"]) == (2, 5.0, "2")
    assert "train_seconds" not in record.final_metrics()  # the per-epoch key is never a trial's figure


def test_a_models_dir_under_home_is_written_where_preflight_checked_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """`models_dir: ~/models` is the home folder's models/, for the writer as for preflight's check."""
    from fmnist_hpo.files import checkpoint_file, models_folder

    monkeypatch.setenv("HOME", str(tmp_path))
    assert checkpoint_file(models_folder("~/models", "exp12"), "abc") == tmp_path / "models" / "exp12" / "abc.pt"
