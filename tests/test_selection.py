"""Honest selection by construction: one kept epoch, distinct configurations, means over repeats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tiny_raw
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from fmnist_hpo.cli.app import app
from fmnist_hpo.config.space import config_key, grid_points, space_size
from fmnist_hpo.records import TrialRecord
from fmnist_hpo.search import sweep as sweep_module
from fmnist_hpo.search.hyperopt_space import to_hyperopt
from fmnist_hpo.selection import select

runner = CliRunner()
# 27 configurations, like exp12's space: TPE with seed 0 proposes some of them twice in its first ten
DISCRETE = {"model.filters": {"choice": [4, 6, 8]}, "model.units1": {"choice": [8, 12, 16]},
            "model.units2": {"choice": [8, 12, 16]}}
SWEPT = tuple(DISCRETE)


def write_spec(folder: Path, raw: dict) -> Path:
    path = folder / f"{raw['experiment']}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def trials_of(experiment: str) -> list:
    client = MlflowClient(f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return [r for r in runs if r.data.tags.get("fmnist.role") == "trial"]


def configuration(run) -> tuple:
    return tuple(run.data.params[key] for key in SWEPT)


def test_hyperopt_alone_proposes_duplicates_here():
    """The premise of the next test: without our check, some of these ten trials would be retrained twins."""
    from hyperopt import Trials, fmin, tpe

    seen: list[tuple] = []

    def record(point: dict) -> float:
        seen.append(config_key(point))
        return float(len(seen) % 3)

    fmin(record, to_hyperopt(DISCRETE), algo=tpe.suggest, max_evals=10, trials=Trials(),
         rstate=np.random.default_rng(0), show_progressbar=False)
    assert len(set(seen)) < 10


def test_a_tpe_sweep_trains_max_evals_distinct_configurations(tmp_path: Path, data_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    raw = tiny_raw(data_dir, experiment="distinct", model={"num_blocks": 1},
                   search={"max_evals": 10, "algo": "tpe", "seed": 0, "space": DISCRETE})
    result = runner.invoke(app, ["run", str(write_spec(tmp_path, raw)), "--quiet"])
    assert result.exit_code == 0, result.stderr
    trials = trials_of("distinct")
    assert len(trials) == 10 and len({configuration(t) for t in trials}) == 10
    assert sorted(int(t.data.tags["point"]) for t in trials) == list(range(10))


def test_a_space_smaller_than_max_evals_ends_when_every_point_is_done(tmp_path: Path, data_dir: Path,
                                                                      monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    space = {"model.filters": {"choice": [4, 8]}, "train.batch_size": {"quniform": [32, 64, 32]}}
    assert space_size(space) == 4 and len(grid_points(space)) == 4
    raw = tiny_raw(data_dir, experiment="small", search={"max_evals": 9, "algo": "tpe", "space": space})
    result = runner.invoke(app, ["run", str(write_spec(tmp_path, raw))])
    assert result.exit_code == 0, result.stderr
    assert "the search space holds only 4 configurations: each was trained once" in result.stderr
    trials = trials_of("small")
    assert len(trials) == 4
    assert {(t.data.params["model.filters"], t.data.params["train.batch_size"]) for t in trials} == {
        ("4", "32"), ("4", "64"), ("8", "32"), ("8", "64")}


def test_an_interrupted_tpe_sweep_resumes_off_a_terminal_without_retraining(tmp_path: Path, data_dir: Path,
                                                                           monkeypatch: pytest.MonkeyPatch):
    """Off a terminal (CliRunner's stdin is not one) a plain rerun continues the interrupted sweep, saying so."""
    monkeypatch.chdir(tmp_path)
    raw = tiny_raw(data_dir, experiment="tperesume", model={"num_blocks": 1},
                   search={"max_evals": 6, "algo": "tpe", "seed": 0, "space": DISCRETE})
    spec = write_spec(tmp_path, raw)
    real = sweep_module.train_and_test
    calls = []

    def interrupt_the_fourth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "train_and_test", interrupt_the_fourth)
    first = runner.invoke(app, ["run", str(spec), "--quiet"])
    assert first.exit_code == 130, first.stderr
    before = {t.info.run_id: configuration(t) for t in trials_of("tperesume") if t.info.status == "FINISHED"}
    assert len(before) == 3

    monkeypatch.setattr(sweep_module, "train_and_test", real)
    again = runner.invoke(app, ["run", str(spec)])
    assert again.exit_code == 0, again.stderr
    assert "continuing the interrupted sweep" in again.stderr
    trials = trials_of("tperesume")
    assert len(trials) == 6 and all(t.info.status == "FINISHED" for t in trials)
    assert len({configuration(t) for t in trials}) == 6  # TPE's rebuilt history keeps it off the trained points
    assert {t.info.run_id: configuration(t) for t in trials if t.info.run_id in before} == before
    assert len(list({t.data.tags["mlflow.parentRunId"] for t in trials})) == 1


def record(number: int, point: int, repeat: int, val: float, test: float, **fields) -> TrialRecord:
    return TrialRecord(number, f"run{number}", {"x": point}, point, repeat, kept_val_accuracy=val,
                       kept_val_loss=1 - val, test_accuracy=test, **fields)


def test_repeats_are_selected_by_their_mean_not_the_luckiest_run():
    runs = [record(0, 0, 0, 0.95, 0.90), record(1, 0, 1, 0.80, 0.80),  # one lucky seed, a poor mean
            record(2, 1, 0, 0.90, 0.91), record(3, 1, 1, 0.91, 0.92)]
    chosen = select(runs, "val_accuracy")
    assert [r.number for r in chosen.runs] == [2, 3] and chosen.representative.number == 3
    assert chosen.mean(lambda r: r.test_accuracy) == pytest.approx(0.915)
    assert chosen.std(lambda r: r.test_accuracy) == pytest.approx(np.std([0.91, 0.92], ddof=1))


def test_pruned_failed_and_untested_runs_are_never_selected():
    runs = [record(0, 0, 0, 0.99, 0.99, pruned_at=2), record(1, 1, 0, 0.98, float("nan")),
            record(2, 2, 0, 0.97, 0.97, status="failed"), record(3, 3, 0, 0.50, 0.50)]
    assert select(runs, "val_accuracy").representative.number == 3
    assert select(runs[:3], "val_accuracy") is None


def test_a_configuration_whose_weak_repeats_were_pruned_cannot_win_on_its_lucky_one():
    steady = [record(i, 0, i, 0.91, 0.90) for i in range(3)]
    lucky = [record(3, 1, 0, 0.93, 0.92), record(4, 1, 1, 0.80, 0.80, pruned_at=2),
             record(5, 1, 2, 0.81, 0.81, pruned_at=2)]
    chosen = select(steady + lucky, "val_accuracy")
    assert [r.number for r in chosen.runs] == [0, 1, 2]


def test_a_configuration_proposed_again_is_answered_from_its_stored_result_and_counted():
    from fmnist_hpo.config.space import MAX_REPEATED_PROPOSALS
    from fmnist_hpo.search.strategy import Trained

    trained = Trained()
    assert trained.is_new({"model.filters": 8})
    trained.record({"model.filters": 8}, 0.25)
    for _ in range(MAX_REPEATED_PROPOSALS - 1):
        assert not trained.is_new({"model.filters": 8})
    assert trained.loss({"model.filters": 8}) == 0.25 and not trained.exhausted
    assert not trained.is_new({"model.filters": 8}) and trained.exhausted
    assert trained.is_new({"model.filters": 16}) and trained.repeated == 0 and len(trained) == 1
