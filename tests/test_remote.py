"""Tracking over HTTP, end to end: `fmnist serve-ui` as the server, sweeps that log to it (one process, or
workers of a Ray cluster started the documented way), and the commands that read the runs back."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import tiny_raw, write_dataset
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from fmnist_hpo.cli.app import app

runner = CliRunner()
# a dead server fails a request after one quick retry instead of MLflow's minutes of backoff
FAST_FAILING = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def served(store: Path, port: int) -> Iterator[str]:
    """`fmnist serve-ui --create` on store at port, stopped however the block ends; yields its URL."""
    store.parent.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen([sys.executable, "-m", "fmnist_hpo", "serve-ui", "--create", "--port", str(port),
                                "--tracking-uri", f"sqlite:///{store}"], cwd=store.parent,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(2):  # "starting MLflow ..." at once, "MLflow UI at ..." when it answers
            line = process.stdout.readline()
        assert line.startswith("MLflow UI at "), line + process.stderr.read()
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def write_spec(folder: Path, data_dir: Path, experiment: str, epochs: int, max_evals: int, **search) -> Path:
    raw = tiny_raw(data_dir, experiment=experiment, train={"epochs": epochs, "patience": None},
                   search={"max_evals": max_evals, "space": {"model.filters": {"choice": [4, 8]}}, **search},
                   mlflow={"log_model": "best"})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{experiment}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def fmnist_run(spec: Path, uri: str, *extra: str, timeout: float = 300,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fmnist_hpo", "run", str(spec), "--tracking-uri", uri, "--quiet", *extra],
                          cwd=spec.parent, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **FAST_FAILING, **(env or {})})


def logged_runs(uri: str, experiment: str) -> tuple[MlflowClient, list, list]:
    client = MlflowClient(uri)
    found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return (client, [r for r in found if r.data.tags.get("fmnist.role") == "sweep"],
            [r for r in found if r.data.tags.get("fmnist.role") == "trial"])


def check_read_back(uri: str, experiment: str, expected_trials: int, data_dir: Path, reader: Path,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs, checkpoints and the model are on the server; analyze, evaluate --best and register read them."""
    client, parents, trials = logged_runs(uri, experiment)
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert sorted(t.info.status for t in trials) == ["FINISHED"] * expected_trials
    for trial in trials:
        assert [a.path for a in client.list_artifacts(trial.info.run_id, "checkpoint")] == [
            f"checkpoint/{trial.info.run_id}.pt"]
    best = client.get_run(parents[0].data.tags["selected_run_id"])
    model = client.get_logged_model(best.data.tags["model_uri"].removeprefix("models:/"))
    assert model.source_run_id == best.info.run_id

    reader.mkdir()
    monkeypatch.chdir(reader)  # no models/ here: evaluate must download the checkpoint from the server
    analyzed = runner.invoke(app, ["analyze", "--experiment", experiment, "--tracking-uri", uri, "--format", "json"])
    assert analyzed.exit_code == 0, analyzed.stderr
    assert str(expected_trials) in json.dumps(json.loads(analyzed.stdout))
    evaluated = runner.invoke(app, ["evaluate", "--experiment", experiment, "--best", "--tracking-uri", uri,
                                    "--data-root", str(data_dir), "--png", str(reader / "cm.png")])
    assert evaluated.exit_code == 0, evaluated.stderr
    assert evaluated.stdout.startswith(f"{best.info.run_id}: test accuracy ")
    registered = runner.invoke(app, ["register", "--experiment", experiment, "--name", f"{experiment}-cnn",
                                     "--tracking-uri", uri])
    assert registered.exit_code == 0, registered.stderr
    assert registered.stdout.startswith(f"registered {experiment}-cnn version 1 ")
    assert client.get_model_version_by_alias(f"{experiment}-cnn", "champion").run_id == best.info.run_id


def test_a_sweep_logs_to_a_tracking_server_and_is_read_back(tmp_path: Path, data_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch):
    with served(tmp_path / "server" / "mlflow.db", free_port()) as uri:
        spec = write_spec(tmp_path / "worker", data_dir, "remote", epochs=1, max_evals=2)
        done = fmnist_run(spec, uri)
        assert done.returncode == 0, done.stderr
        assert not (spec.parent / "mlflow.db").exists()  # everything went to the server
        check_read_back(uri, "remote", 2, data_dir, tmp_path / "reader", monkeypatch)


def first_epoch_logged(uri: str, experiment: str) -> bool:
    try:
        _, _, trials = logged_runs(uri, experiment)
    except Exception:  # the experiment does not exist yet
        return False
    return any("val_loss" in t.data.metrics for t in trials)


def test_a_server_lost_mid_sweep_is_one_line_and_the_sweep_resumes(tmp_path: Path):
    data = write_dataset(tmp_path / "data", n_train=3000, n_test=100)  # epochs long enough to stop the server in one
    port = free_port()
    store = tmp_path / "server" / "mlflow.db"
    # 16 epochs of ~0.5 s: the sweep is still training when the server has stopped (SIGTERM takes 1-3 s)
    spec = write_spec(tmp_path / "worker", data, "lost", epochs=8, max_evals=2)
    with served(store, port) as uri:
        sweep = subprocess.Popen([sys.executable, "-m", "fmnist_hpo", "run", str(spec), "--tracking-uri", uri, "--quiet"],
                                 cwd=spec.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, **FAST_FAILING})
        try:
            deadline = time.monotonic() + 120
            while not first_epoch_logged(uri, "lost") and sweep.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert sweep.poll() is None, "the sweep ended before the server could be stopped"
        except BaseException:
            stop(sweep)
            raise
    try:
        _, stderr = sweep.communicate(timeout=180)
    finally:
        stop(sweep)
    assert sweep.returncode == 75, stderr  # the machine's failure, not the user's input: an interruption
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith(
        f"error: the tracking server {uri} does not answer; start it again, then: fmnist run "), stderr
    with served(store, port):
        resumed = fmnist_run(spec, uri, "--resume")
        assert resumed.returncode == 0, resumed.stderr
        _, parents, trials = logged_runs(uri, "lost")
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert sorted(t.info.status for t in trials) == ["FINISHED", "FINISHED"]


RAY = str(Path(sys.executable).parent / "ray")
# `ray start` (Ray >= 2.5x) turns on token authentication for the cluster; drivers must say so too
RAY_TOKEN_AUTH = {"RAY_AUTH_MODE": "token"}


@contextlib.contextmanager
def ray_head(port: int, temp_dir: Path) -> Iterator[str]:
    """A one-machine Ray cluster started the documented way (`ray start --head`), as its own process.

    --block keeps `ray start` in the foreground, and SIGTERM to it stops this cluster only: `ray stop`
    would stop every Ray instance on the machine, other people's included.
    """
    process = subprocess.Popen([RAY, "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
                                "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard", "false",
                                "--disable-usage-stats", "--temp-dir", str(temp_dir), "--block"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                               env={**os.environ, **RAY_TOKEN_AUTH})
    address = f"127.0.0.1:{port}"
    try:
        wait_for_ray(address, process)
        yield address
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # `ray start --block` drains and stops its own processes
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def wait_for_ray(address: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        status = subprocess.run([RAY, "status", "--address", address], capture_output=True, text=True, timeout=60,
                                env={**os.environ, **RAY_TOKEN_AUTH})
        if status.returncode == 0 and "CPU" in status.stdout:
            return
        time.sleep(1)
    raise AssertionError(f"ray start --head did not come up at {address}")


@pytest.mark.cluster
def test_a_parallel_sweep_on_a_ray_cluster_logs_to_a_tracking_server(tmp_path: Path, data_dir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("ray", reason="the Ray engine needs the [ray] extra")
    ray_temp = Path(f"/tmp/fr{os.getpid()}")  # Ray's socket paths must stay short
    try:
        with ray_head(free_port(), ray_temp) as address, served(tmp_path / "server" / "mlflow.db", free_port()) as uri:
            spec = write_spec(tmp_path / "worker", data_dir, "clustered", epochs=1, max_evals=2, parallel=2)
            done = fmnist_run(spec, uri, "--parallel", "2", "--ray-address", address, timeout=600, env=RAY_TOKEN_AUTH)
            assert done.returncode == 0, done.stderr
            check_read_back(uri, "clustered", 2, data_dir, tmp_path / "reader", monkeypatch)
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)
