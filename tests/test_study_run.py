"""Several specs in one command: validated together, run in order, resumable, estimated by a dry run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import tiny_raw
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from fmnist_hpo.cli.app import app
from fmnist_hpo.search import sweep as sweep_module

runner = CliRunner()


def spec(folder: Path, data_dir: Path, name: str, **sections) -> Path:
    raw = tiny_raw(data_dir, experiment=name, search={"max_evals": 2, "algo": "random",
                                                      "space": {"train.lr": {"loguniform": [1e-3, 1e-2]}}}, **sections)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def trials(experiment: str) -> list:
    client = MlflowClient(f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    return [r for r in runs if r.data.tags.get("fmnist.role") == "trial"]


def test_every_spec_is_validated_before_anything_runs(tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    good = spec(tmp_path, data_dir, "good")
    bad = spec(tmp_path, data_dir, "bad", train={"epochs": 0})
    worse = spec(tmp_path, data_dir, "worse", model={"filters": -1})
    result = runner.invoke(app, ["run", str(good), str(bad), str(worse)])
    assert result.exit_code == 2
    assert "bad.yaml: train.epochs: must be >= 1" in result.stderr and "worse.yaml: model.filters" in result.stderr
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_two_specs_naming_one_experiment_are_refused_in_one_line(tmp_path: Path, data_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch, dry_run: list):
    monkeypatch.chdir(tmp_path)
    first = spec(tmp_path, data_dir, "same")
    copy = tmp_path / "copy.yaml"
    copy.write_text(first.read_text())
    result = runner.invoke(app, ["run", str(first), str(copy), *dry_run])
    assert result.exit_code == 2
    assert result.stderr == (f"error: {first} and {copy} both name experiment 'same': pass one of them, "
                             "or give one another `experiment:`\n")
    assert not (tmp_path / "mlflow.db").exists()


def test_the_shipped_specs_name_distinct_experiments():
    from fmnist_hpo.config.loading import load
    from fmnist_hpo.search.plan import check_distinct_experiments

    paths = sorted(Path(__file__).parents[1].glob("configs/*.yaml"))
    check_distinct_experiments([(p, load(p, [], {})) for p in paths])


def test_specs_run_in_order_and_a_rerun_skips_finished_ones(tmp_path: Path, data_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    paths = [str(spec(tmp_path, data_dir, name)) for name in ("first", "second")]
    result = runner.invoke(app, ["run", *paths, "--quiet"])
    assert result.exit_code == 0, result.stderr
    assert "2 experiment(s)" in result.stdout and result.stdout.count("finished") == 2
    assert len(trials("first")) == 2 and len(trials("second")) == 2

    again = runner.invoke(app, ["run", *paths, "--quiet"])
    assert again.exit_code == 0, again.stderr
    assert again.stdout.count("done before") == 2
    assert len(trials("first")) == 2 and len(trials("second")) == 2  # nothing trained twice


def test_an_interrupted_multi_spec_run_continues_where_it_stopped(tmp_path: Path, data_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    paths = [str(spec(tmp_path, data_dir, name)) for name in ("one", "two")]
    real = sweep_module.train_and_test

    def interrupt_in_two(cfg, *args, **kwargs):
        if cfg.experiment == "two":
            raise KeyboardInterrupt
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(sweep_module, "train_and_test", interrupt_in_two)
    first = runner.invoke(app, ["run", *paths, "--quiet"])
    assert first.exit_code == 130
    assert f"fmnist run {paths[0]} {paths[1]}" in first.stderr and "--resume" in first.stderr
    monkeypatch.setattr(sweep_module, "train_and_test", real)
    resumed = runner.invoke(app, ["run", *paths, "--quiet", "--resume"])
    assert resumed.exit_code == 0, resumed.stderr
    assert "done before" in resumed.stdout and "finished" in resumed.stdout
    assert sorted(t.info.status for t in trials("two")) == ["FINISHED", "FINISHED"]
    assert len(trials("one")) == 2


def test_a_dry_run_estimates_each_experiment(tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    paths = [str(spec(tmp_path, data_dir, "small")), str(spec(tmp_path, data_dir, "large", train={"epochs": 3},
                                                               model={"filters": 16}))]
    result = runner.invoke(app, ["run", *paths, "--dry-run"])
    assert result.exit_code == 0, result.stderr
    assert "# rough estimate on cpu" in result.stdout and "test pass, warm-up and logging" in result.stdout
    assert "#   small: 2 run(s) x up to 1 epoch(s)" in result.stdout
    assert "#   large: 2 run(s) x up to 3 epoch(s)" in result.stdout and "#   total: about" in result.stdout
    assert "# timing small: model 1 of 1 ..." in result.stderr  # progress while the probe runs
    assert not (tmp_path / "mlflow.db").exists()


def test_the_estimate_adds_fixed_costs_to_the_epochs(monkeypatch: pytest.MonkeyPatch):
    from fmnist_hpo.config.sections import validate
    from fmnist_hpo.search import plan

    monkeypatch.setattr(plan, "probe", lambda cfg, device: plan.Probe(epoch_seconds=2.0, test_seconds=0.5,
                                                                      warmup_seconds=1.5))
    cfg = validate({"train": {"epochs": 4}, "search": {"max_evals": 3, "space": {
        "train.lr": {"loguniform": [1e-4, 1e-2]}}}})
    said = []
    result = plan.estimate(cfg, "cpu", on_probe=said.append)
    assert result.run_seconds == pytest.approx(4 * 2.0 + 0.5 + 1.5 + plan.TRIAL_FIXED_SECONDS)
    assert result.total_seconds == pytest.approx(3 * result.run_seconds + plan.SWEEP_FIXED_SECONDS)
    assert said == ["timing default: model 1 of 1"]


def test_a_step_costs_the_median_of_its_rounds(monkeypatch: pytest.MonkeyPatch):
    from fmnist_hpo.search import plan

    rounds = iter([0.1, 5.0, 0.12])  # one round slowed by a busy core: three rounds, then the budget is spent
    monkeypatch.setattr(plan, "_timed", lambda fn: next(rounds))
    assert plan._median_seconds(lambda: None) == pytest.approx(0.12)
