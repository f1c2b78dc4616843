"""Damage the product notices itself: damaged finished checkpoints, a model logging cut off by an interrupt."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow.pytorch
import pytest
import yaml
from conftest import tiny_raw
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from fmnist_hpo.cli.app import app
from fmnist_hpo.search import sweep as sweep_module
from fmnist_hpo.training.checkpoints import read_checkpoint

runner = CliRunner()
EXPERIMENT = "damaged"


@pytest.fixture
def spec(tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    raw = tiny_raw(data_dir, experiment=EXPERIMENT, search={"max_evals": 2, "space": {"model.filters": {"choice": [4, 8]}}},
                   mlflow={"log_model": "best"})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def client() -> MlflowClient:
    return MlflowClient(f"sqlite:///{Path.cwd() / 'mlflow.db'}")


def trials() -> list:
    found = client().get_experiment_by_name(EXPERIMENT)
    runs = client().search_runs([found.experiment_id], "tags.`fmnist.role` = 'trial'")
    return sorted(runs, key=lambda r: int(r.data.tags["trial"]))


def interrupted_after_one_trial(spec: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A sweep cut off by Ctrl-C in its second trial; returns the finished first trial's run id."""
    real = sweep_module.train_and_test
    calls = []

    def second_is_interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(sweep_module, "train_and_test", second_is_interrupted)
        result = runner.invoke(app, ["run", str(spec), "--quiet"])
    assert result.exit_code == 130, result.stdout + result.stderr
    (finished,) = [t for t in trials() if t.info.status == "FINISHED"]
    return finished.info.run_id


def artifact_checkpoint(run_id: str) -> Path:
    return Path(client().get_run(run_id).info.artifact_uri.removeprefix("file://")) / "checkpoint" / f"{run_id}.pt"


def verified() -> str:
    result = runner.invoke(app, ["verify", "--all", "--tracking-uri", f"sqlite:///{Path.cwd() / 'mlflow.db'}"])
    assert result.exit_code == 0, result.stdout
    return result.stdout


def test_a_damaged_checkpoint_is_restored_from_its_artifact_copy_on_resume(spec: Path, monkeypatch: pytest.MonkeyPatch):
    run_id = interrupted_after_one_trial(spec, monkeypatch)
    local = Path("models", EXPERIMENT, f"{run_id}.pt")
    local.write_bytes(os.urandom(2048))
    result = runner.invoke(app, ["run", str(spec), "--resume", "--quiet"])
    assert result.exit_code == 0, result.stdout + result.stderr
    assert local.read_bytes() == artifact_checkpoint(run_id).read_bytes()
    read_checkpoint(local)
    assert [t.info.status for t in trials()] == ["FINISHED", "FINISHED"]
    assert "everything holds" in verified()


def test_a_checkpoint_with_no_intact_copy_is_trained_again_on_resume(spec: Path, monkeypatch: pytest.MonkeyPatch):
    run_id = interrupted_after_one_trial(spec, monkeypatch)
    for path in (Path("models", EXPERIMENT, f"{run_id}.pt"), artifact_checkpoint(run_id)):
        path.write_bytes(os.urandom(2048))
    result = runner.invoke(app, ["run", str(spec), "--resume", "--quiet"])
    assert result.exit_code == 0, result.stdout + result.stderr
    runs = trials()
    lost = next(t for t in runs if t.info.run_id == run_id)
    assert (lost.info.status, lost.data.tags["interrupted"]) == ("FAILED", "true")
    assert "not a loadable checkpoint" in lost.data.tags["checkpoint_lost"]
    again = [t for t in runs if t.info.status == "FINISHED"]
    assert len(again) == 2 and lost.data.tags["point"] in {t.data.tags["point"] for t in again}
    assert "everything holds" in verified()


def test_a_model_logging_cut_off_by_an_interrupt_is_redone_once_on_resume(spec: Path, monkeypatch: pytest.MonkeyPatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(mlflow.pytorch, "log_model", interrupted)
        result = runner.invoke(app, ["run", str(spec), "--quiet"])
    assert result.exit_code == 130
    experiment = client().get_experiment_by_name(EXPERIMENT).experiment_id
    assert [m.status for m in client().search_logged_models([experiment])] == [LoggedModelStatus.PENDING]
    result = runner.invoke(app, ["run", str(spec), "--resume", "--quiet"])
    assert result.exit_code == 0, result.stdout + result.stderr
    models = client().search_logged_models([experiment])
    assert [m.status for m in models] == [LoggedModelStatus.READY]
    best = client().get_run(models[0].source_run_id)
    assert best.data.tags["model_uri"] == f"models:/{models[0].model_id}"
    assert [o.model_id for o in best.outputs.model_outputs] == [models[0].model_id]
    assert "everything holds" in verified()


def test_evaluate_restores_a_damaged_checkpoint_from_its_artifact_copy(spec: Path, data_dir: Path):
    assert runner.invoke(app, ["run", str(spec), "--quiet"]).exit_code == 0
    run_id = trials()[0].info.run_id
    local = Path("models", EXPERIMENT, f"{run_id}.pt")
    local.write_bytes(os.urandom(2048))
    result = runner.invoke(app, ["evaluate", run_id, "--png", "cm.png", "--data-root", str(data_dir)])
    assert result.exit_code == 0, result.stdout + result.stderr
    assert local.read_bytes() == artifact_checkpoint(run_id).read_bytes()
    artifact_checkpoint(run_id).write_bytes(b"gone too")
    local.write_bytes(b"gone")
    result = runner.invoke(app, ["evaluate", run_id, "--png", "cm.png", "--data-root", str(data_dir)])
    assert result.exit_code == 2
    assert "no intact copy in its artifacts" in result.stderr and result.stderr.count("\n") == 1
