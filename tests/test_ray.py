"""The Ray Tune engine (search.parallel > 1) and pruning, on a local Ray instance and tiny data."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_raw
from mlflow.tracking import MlflowClient

pytest.importorskip("ray", reason="the Ray engine needs the [ray] extra")


def spec(folder: Path, data_dir: Path, name: str, epochs: int = 3, **search) -> Path:
    raw = tiny_raw(data_dir, experiment=name, train={"epochs": epochs, "patience": None},
                   search={"max_evals": 4, "parallel": 2, "seed": 5,
                           "space": {"train.lr": {"loguniform": [1e-3, 1e-2]}}, **search})
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def fmnist(folder: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fmnist_hpo", "run", *args, "--quiet"], cwd=folder,
                          capture_output=True, text=True, timeout=timeout)


def runs(folder: Path, experiment: str):
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in found if r.data.tags.get("fmnist.role") == "sweep"]
    trials = [r for r in found if r.data.tags.get("fmnist.role") == "trial"]
    return client, parents, trials


@pytest.mark.cluster  # each starts a local Ray cluster
def test_parallel_sweep_logs_like_the_sequential_engine(tmp_path: Path, data_dir: Path):
    for name in ("first", "again"):
        done = fmnist(tmp_path, str(spec(tmp_path, data_dir, name)))
        assert done.returncode == 0, done.stderr
    client, parents, trials = runs(tmp_path, "first")
    assert len(parents) == 1 and len(trials) == 4
    parent = parents[0]
    assert all(t.data.tags["mlflow.parentRunId"] == parent.info.run_id for t in trials)
    assert sorted(int(t.data.tags["trial"]) for t in trials) == [0, 1, 2, 3]
    for trial in trials:
        assert trial.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(trial.info.run_id, "val_loss")] == [0, 1, 2]
        assert {"test_accuracy", "kept_val_accuracy", "kept_epoch", "epochs_run"} <= set(trial.data.metrics)
        history = sorted(client.get_metric_history(trial.info.run_id, "val_accuracy"), key=lambda m: m.step)
        kept = int(trial.data.metrics["kept_epoch"])  # counted from 1
        assert trial.data.metrics["kept_val_accuracy"] == max(m.value for m in history) == history[kept - 1].value
        assert (tmp_path / "models" / "first" / f"{trial.info.run_id}.pt").is_file()
    best = max(trials, key=lambda t: (t.data.metrics["kept_val_accuracy"], -int(t.data.tags["trial"])))
    assert parent.data.tags["selected_run_id"] == best.info.run_id
    assert parent.data.metrics["selected_test_accuracy"] == best.data.metrics["test_accuracy"]
    _, _, again = runs(tmp_path, "again")  # the same seed samples the same points
    assert sorted(float(t.data.params["train.lr"]) for t in again) == sorted(float(t.data.params["train.lr"]) for t in trials)


def test_median_pruning_stops_an_obviously_bad_trial(tmp_path: Path, data_dir: Path):
    path = spec(tmp_path, data_dir, "pruned", epochs=6, parallel=1, algo="grid", pruner="median", grace_epochs=1,
                space={"train.lr": {"choice": [0.003, 0.004, 1e-6]}})
    done = fmnist(tmp_path, str(path))
    assert done.returncode == 0, done.stderr
    _, _, trials = runs(tmp_path, "pruned")
    bad = next(t for t in trials if float(t.data.params["train.lr"]) == 1e-6)
    assert bad.info.status == "FINISHED" and bad.data.tags["pruned"] == "true"
    assert int(bad.data.tags["pruned_at_epoch"]) < 5 and bad.data.metrics["epochs_run"] < 6
    assert all("pruned" not in t.data.tags for t in trials if t is not bad)


@pytest.mark.cluster  # each starts a local Ray cluster
def test_asha_prunes_on_the_ray_engine(tmp_path: Path, data_dir: Path):
    path = spec(tmp_path, data_dir, "asha", epochs=6, max_evals=8, algo="random", seed=1, pruner="asha",
                grace_epochs=1, space={"train.lr": {"choice": [0.003, 0.004, 0.005, 0.006, 1e-6, 2e-6, 3e-6, 4e-6]}})
    done = fmnist(tmp_path, str(path))
    assert done.returncode == 0, done.stderr
    _, parents, trials = runs(tmp_path, "asha")
    assert len(trials) == 8 and all(t.info.status == "FINISHED" for t in trials)
    pruned = [t for t in trials if t.data.tags.get("pruned") == "true"]
    assert pruned, "ASHA stopped no trial"
    assert all(t.data.metrics["epochs_run"] < 6 and "pruned_at_epoch" in t.data.tags for t in pruned)
    assert len({t.data.params["train.lr"] for t in trials}) == 8  # no configuration trained twice
    assert parents[0].data.tags["selected_run_id"] not in {t.info.run_id for t in pruned}


@pytest.mark.cluster  # each starts a local Ray cluster
def test_an_interrupted_ray_sweep_resumes_to_exactly_max_evals(tmp_path: Path, data_dir: Path):
    path = spec(tmp_path, data_dir, "resumed", epochs=25)
    process = subprocess.Popen([sys.executable, "-m", "fmnist_hpo", "run", str(path), "--quiet"], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list((tmp_path / "models" / "resumed").glob("*.pt")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no trial finished"
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr

    done = fmnist(tmp_path, str(path), "--resume")
    assert done.returncode == 0, done.stderr
    _, parents, trials = runs(tmp_path, "resumed")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    finished = [t for t in trials if t.info.status == "FINISHED"]
    assert len(finished) == 4
    assert "RUNNING" not in {t.info.status for t in trials}
    numbers = [int(t.data.tags["trial"]) for t in trials]
    assert len(numbers) == len(set(numbers))
    cut_off = [t for t in trials if t.info.status != "FINISHED"]
    assert all(t.data.tags.get("interrupted") == "true" for t in cut_off)
    rerun = {t.data.params["train.lr"] for t in finished}
    assert all(t.data.params["train.lr"] in rerun for t in cut_off)  # their configurations ran again
