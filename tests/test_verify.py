"""`fmnist verify` on a real (tiny) sweep, and on copies of it damaged one fault at a time."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_raw, write_dataset
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from fmnist_hpo.cli.app import app

runner = CliRunner()
EXPERIMENT = "checked"


@pytest.fixture(scope="session")
def pristine(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A two-trial, two-epoch sweep with its best model logged, in a folder of its own (store, mlruns, models)."""
    folder = tmp_path_factory.mktemp("pristine")
    raw = tiny_raw(data_dir, experiment=EXPERIMENT, search={"max_evals": 2, "space": {"model.filters": {"choice": [4, 8]}}},
                   train={"epochs": 2}, mlflow={"log_model": "best"})
    (folder / "spec.yaml").write_text(yaml.safe_dump(raw))
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        result = runner.invoke(app, ["run", "spec.yaml", "--quiet"])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output + result.stderr
    (folder / ".mlflow.db.lock").unlink(missing_ok=True)
    return folder


@dataclass
class Store:
    folder: Path
    uri: str
    client: MlflowClient
    sweep: str
    best: str  # the selected trial's run (it has the logged model)
    other: str

    def checkpoint(self, run_id: str) -> Path:
        return self.folder / "models" / EXPERIMENT / f"{run_id}.pt"

    def artifact_checkpoint(self, run_id: str) -> Path:
        return Path(self.client.get_run(run_id).info.artifact_uri.removeprefix("file://")) / "checkpoint" / f"{run_id}.pt"

    def sql(self, statement: str, *args: object) -> None:
        with sqlite3.connect(self.folder / "mlflow.db") as db:
            db.execute(statement, args)


@pytest.fixture
def store(pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    """A copy of the pristine sweep whose records point at its own artifacts; the working folder is the copy."""
    folder = tmp_path / "store"
    shutil.copytree(pristine, folder)
    with sqlite3.connect(folder / "mlflow.db") as db:
        for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                              ("logged_models", "artifact_location")):
            db.execute(f"UPDATE {table} SET {column} = replace({column}, ?, ?)", (str(pristine), str(folder)))
    monkeypatch.chdir(folder)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    (sweep,) = client.search_runs([experiment], "tags.`fmnist.role` = 'sweep'")
    best = sweep.data.tags["selected_run_id"]
    other = next(r.info.run_id for r in client.search_runs([experiment], "tags.`fmnist.role` = 'trial'")
                 if r.info.run_id != best)
    return Store(folder, uri, client, sweep.info.run_id, best, other)


def verify(store: Store, *args: str):
    return runner.invoke(app, ["verify", "--all", "--tracking-uri", store.uri, *args])


def problem_lines(result) -> list[str]:
    return [line for line in result.stdout.splitlines()[:-1] if not line.startswith("note: ")]


def caught(store: Store, run_id: str, phrase: str, *args: str) -> None:
    result = verify(store, *args)
    assert result.exit_code == 1, result.stdout + result.stderr
    lines = problem_lines(result)
    assert any(run_id[:8] in line and phrase in line for line in lines), "\n".join(lines)
    assert result.stdout.splitlines()[-1].startswith("verified 1 experiment(s), 1 sweep(s), 2 trial(s)")


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- an intact store -------------------------------------------------------------------------------


def test_an_intact_sweep_holds_and_verify_writes_nothing(store: Store):
    before = snapshot(store.folder)
    result = verify(store)
    assert result.exit_code == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == ["verified 1 experiment(s), 1 sweep(s), 2 trial(s), 2 re-scored: everything holds"]
    assert snapshot(store.folder) == before  # no lock file, no artifact, no row changed


def test_verify_from_another_folder_creates_nothing_there(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # models/ is not here: the artifact copies are what is checked
    result = verify(store, "--rescore", "1")
    assert result.exit_code == 0, result.stdout
    assert list(elsewhere.iterdir()) == []


def test_json_names_every_problem_with_its_run(store: Store):
    store.client.log_metric(store.other, "kept_val_loss", 123.0)
    result = verify(store, "--format", "json", "--rescore", "1")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["summary"]["rescored"] == 1
    assert [(p["run_id"], p["check"]) for p in report["problems"]] == [(store.other, "figures")]


def test_rescore_zero_skips_the_test_set_and_bad_requests_are_exit_2(store: Store):
    result = verify(store, "--rescore", "0")
    assert result.exit_code == 0 and "0 re-scored" in result.stdout
    neither = runner.invoke(app, ["verify", "--tracking-uri", store.uri])
    assert neither.exit_code == 2 and "--all" in neither.stderr
    unknown = runner.invoke(app, ["verify", "-e", "nope", "--tracking-uri", store.uri])
    assert unknown.exit_code == 2 and unknown.stderr == f"error: unknown experiment 'nope'; known experiments: {EXPERIMENT}\n"
    missing = runner.invoke(app, ["verify", "--all", "--tracking-uri", f"sqlite:///{store.folder / 'none.db'}"])
    assert missing.exit_code == 2 and not (store.folder / "none.db").exists()


# --- statuses --------------------------------------------------------------------------------------


def test_a_trial_left_running_under_a_finished_sweep(store: Store):
    store.client.update_run(store.other, "RUNNING")
    caught(store, store.other, "left RUNNING by a sweep that is not running")


def test_a_sweep_left_running_by_a_dead_process(store: Store):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.client.update_run(store.sweep, "RUNNING")
    store.client.set_tag(store.sweep, "pid", str(dead.pid))
    store.client.set_tag(store.sweep, "host", os.uname().nodename)
    caught(store, store.sweep, "left RUNNING, but its process")


def test_a_live_sweep_and_its_running_trial_are_not_blamed(store: Store):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        store.client.update_run(store.sweep, "RUNNING")
        store.client.set_tag(store.sweep, "pid", str(live.pid))
        store.client.set_tag(store.sweep, "host", os.uname().nodename)
        store.client.update_run(store.other, "RUNNING")
        result = verify(store)
    finally:
        live.kill()
    assert result.exit_code == 0, result.stdout
    assert f"still running (pid {live.pid})" in result.stdout


def test_a_failed_trial_without_its_reason(store: Store):
    store.client.set_terminated(store.other, "FAILED")
    caught(store, store.other, "FAILED with no failure_reason")


def test_a_trial_outside_any_sweep(store: Store):
    store.client.set_tag(store.other, "mlflow.parentRunId", "0" * 32)
    caught(store, store.other, "belongs to no sweep")


# --- history and figures ---------------------------------------------------------------------------


def test_a_missing_epoch_in_the_history(store: Store):
    store.sql("DELETE FROM metrics WHERE run_uuid = ? AND key = 'val_loss' AND step = 1", store.other)
    caught(store, store.other, "val_loss history of 2 epoch(s) is incomplete: no value for epoch(s) 2")


def test_a_kept_epoch_that_is_not_the_best(store: Store):
    kept = int(store.client.get_run(store.best).data.metrics["kept_epoch"])
    store.client.log_metric(store.best, "kept_epoch", 3 - kept)
    caught(store, store.best, f"kept_epoch is {3 - kept}, but the best epoch by val_accuracy is {kept}")


def test_a_final_figure_that_disagrees_with_its_epoch(store: Store):
    value = store.client.get_run(store.other).data.metrics["kept_val_accuracy"]
    store.client.log_metric(store.other, "kept_val_accuracy", value + 0.01)
    caught(store, store.other, "kept_val_accuracy is")


def test_a_trial_time_that_is_not_the_sum_of_its_epochs(store: Store):
    store.client.log_metric(store.other, "trial_seconds", 0.001)
    caught(store, store.other, "trial_seconds is 0.001, its epochs sum to")


# --- checkpoints -----------------------------------------------------------------------------------


def test_a_checkpoint_replaced_by_random_bytes(store: Store):
    store.checkpoint(store.other).write_bytes(os.urandom(4096))
    caught(store, store.other, "not a loadable checkpoint")
    result = verify(store)
    assert "the run's artifact copy is intact" in result.stdout


def test_a_checkpoint_that_is_gone_everywhere(store: Store):
    store.checkpoint(store.other).unlink()
    store.artifact_checkpoint(store.other).unlink()
    caught(store, store.other, "no checkpoint: neither")


def test_a_checkpoint_of_another_run(store: Store):
    shutil.copyfile(store.checkpoint(store.best), store.checkpoint(store.other))
    caught(store, store.other, f"belongs to run {store.best[:8]}")
    caught(store, store.other, "differs from the run's checkpoint artifact")


def test_weights_that_do_not_score_what_was_logged(store: Store):
    for path in (store.checkpoint(store.best), store.artifact_checkpoint(store.best)):
        payload = torch.load(path, weights_only=True)
        payload["state_dict"] = {k: torch.zeros_like(v) for k, v in payload["state_dict"].items()}
        torch.save(payload, path)
    caught(store, store.best, "re-scores 0.1000 on the 100 test images")
    caught(store, store.best, "predicts unlike the checkpoint")


# --- the logged model ------------------------------------------------------------------------------


def test_a_model_uri_that_names_no_model(store: Store):
    store.client.set_tag(store.best, "model_uri", "models:/m-00000000000000000000000000000000")
    caught(store, store.best, "names no LoggedModel")


def test_a_logged_model_that_does_not_load(store: Store):
    model_id = store.client.get_run(store.best).data.tags["model_uri"].removeprefix("models:/")
    folder = Path(store.client.get_logged_model(model_id).artifact_location.removeprefix("file://"))
    (folder / "data" / "model.pt2").write_bytes(b"not a program")
    caught(store, store.best, "does not load through mlflow.pytorch.load_model")


def test_an_unfinished_model_an_interrupt_left(store: Store):
    experiment = store.client.get_experiment_by_name(EXPERIMENT).experiment_id
    pending = store.client.create_logged_model(experiment, name="model", source_run_id=store.other)
    caught(store, store.other, f"its model {pending.model_id} is PENDING")


def test_a_model_filed_in_another_experiment(store: Store):
    misfiled = store.client.create_logged_model("0", name="model", source_run_id=store.other)
    store.client.finalize_logged_model(misfiled.model_id, "READY")
    caught(store, store.other, "is filed in experiment 'Default'")


def test_a_model_not_among_its_runs_outputs(store: Store):
    store.sql("DELETE FROM inputs WHERE source_type = 'RUN_OUTPUT' AND source_id = ?", store.best)
    caught(store, store.best, "does not list models:/")


# --- data lineage and selection --------------------------------------------------------------------


def test_idx_files_that_changed_on_disk(store: Store, tmp_path: Path):
    other_data = write_dataset(tmp_path / "other-data", n_train=400, n_test=100, compress=False)
    first = next(other_data.iterdir())
    first.write_bytes(first.read_bytes()[:-8] + b"\x00" * 8)
    caught(store, store.best, "came from IDX files with digest", "--data-root", str(other_data), "--rescore", "0")


def test_data_that_is_not_there_is_said_not_checked(store: Store, tmp_path: Path):
    result = verify(store, "--data-root", str(tmp_path / "nowhere"))
    assert result.exit_code == 0, result.stdout
    assert "dataset digests cannot be checked" in result.stdout and "cannot be re-scored" in result.stdout
    assert "0 re-scored" in result.stdout
    assert "everything holds" not in result.stdout  # what could not be checked is not reported as holding
    assert result.stdout.splitlines()[-1].endswith("check(s) could not run (the notes above)")


def test_a_sweep_that_selects_another_trial_than_the_rule(store: Store):
    store.client.set_tag(store.sweep, "selected_run_id", store.other)
    caught(store, store.sweep, "but the selection rule (val_accuracy on validation) picks trial")


def test_a_selected_figure_that_is_not_its_runs(store: Store):
    store.client.log_metric(store.sweep, "selected_test_accuracy", 0.999)
    caught(store, store.sweep, "selected_test_accuracy is 0.999")


def test_sweep_counts_that_are_not_its_runs(store: Store):
    store.client.log_metric(store.sweep, "trials_finished", 5)
    caught(store, store.sweep, "trials_finished is 5, its runs hold 2")


def test_a_trial_is_rescored_in_the_precision_it_was_scored_in(store: Store):
    from fmnist_hpo.modelops.verify import _trial_precision
    from fmnist_hpo.records import LoggedTrial
    from fmnist_hpo.training.device import precision_name

    run = store.client.get_run(store.best)
    assert run.data.tags["precision"] == precision_name("auto", torch.device("cpu"))  # auto, resolved when it ran

    def logged(tags: dict, precision: str) -> LoggedTrial:
        return LoggedTrial("r", "e", 0, 0, 0, "FINISHED", {}, {}, {"train.precision": precision}, tags)

    assert _trial_precision(logged({"device": "cpu", "precision": "bf16"}, "auto")) == "bf16"
    assert _trial_precision(logged({"device": "cpu"}, "auto")) == "fp32"  # written before the tag: auto was fp32 on CPUs
    assert _trial_precision(logged({"device": "cuda"}, "bf16")) == "bf16"
