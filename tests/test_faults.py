"""Faults of the machine, injected: a full disk, a read-only folder, a store that stops taking writes.

Each is an interruption (one line naming the cause and the fix, exit 75, the runs KILLED where the
store still takes writes), never a failed trial; `--resume` trains what it cut off.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_raw
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from fmnist_hpo.cli.app import app
from fmnist_hpo.faults import machine_failure
from fmnist_hpo.search.trial_runs import SweepRuns
from fmnist_hpo.training import checkpoints

runner = CliRunner()


def sweep_spec(folder: Path, data_dir: Path, experiment: str = "faults") -> Path:
    raw = tiny_raw(data_dir, experiment=experiment, train={"epochs": 2, "patience": None},
                   search={"max_evals": 3, "algo": "tpe", "space": {"train.lr": {"loguniform": [1e-3, 1e-2]}}})
    path = folder / f"{experiment}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def runs_of(folder: Path, experiment: str) -> tuple[list, list]:
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return ([r for r in runs if r.data.tags.get("fmnist.role") == "sweep"],
            [r for r in runs if r.data.tags.get("fmnist.role") == "trial"])


def test_oserrors_are_the_machines_and_model_errors_the_trials():
    full = machine_failure(OSError(errno.ENOSPC, "No space left on device", "models/quick/x.pt"))
    assert (full.cause, full.fix) == ("no space left on device: models/quick/x.pt", "free space")
    assert machine_failure(PermissionError(errno.EACCES, "Permission denied", "m/x.tmp")).fix == "make it writable"
    assert machine_failure(RuntimeError("shapes do not match")) is None
    assert machine_failure(torch.OutOfMemoryError("CUDA out of memory")) is None


def test_a_full_disk_names_the_file_python_leaves_out(tmp_path: Path):
    def full(tmp: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as raised:
        checkpoints.atomic_write(tmp_path / "x.pt", full)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []


def interrupted_then_resumed(folder: Path, spec: Path, monkeypatch: pytest.MonkeyPatch, inject) -> str:
    """Run the sweep with a fault injected after the first trial; check it stops resumable, then resume it."""
    undo = inject()
    result = runner.invoke(app, ["run", str(spec), "--quiet"])
    undo()
    assert result.exit_code == 75, result.output + result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.rstrip().endswith("--resume")
    parents, trials = runs_of(folder, "faults")
    assert parents[0].info.status == "KILLED"
    assert "FAILED" not in {t.info.status for t in trials}  # TPE is never told about it

    resumed = runner.invoke(app, ["run", str(spec), "--resume", "--quiet"])
    assert resumed.exit_code == 0, resumed.stderr
    parents, trials = runs_of(folder, "faults")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(t.info.status for t in trials) == ["FINISHED"] * 3
    assert parents[0].data.metrics["trials_failed"] == 0
    return result.stderr


def test_a_full_disk_under_models_interrupts_the_sweep(tmp_path: Path, data_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    spec = sweep_spec(tmp_path, data_dir)
    real = checkpoints.torch_save
    written = []

    def inject():
        def fill_up(obj, path: Path) -> None:
            written.append(path)
            if len(written) > 3:  # trial 0: two states and its checkpoint; then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
            real(obj, path)

        monkeypatch.setattr(checkpoints, "torch_save", fill_up)
        return lambda: monkeypatch.setattr(checkpoints, "torch_save", real)

    stderr = interrupted_then_resumed(tmp_path, spec, monkeypatch, inject)
    assert stderr.startswith("error: no space left on device: models/faults/")
    assert "; free space, then: fmnist run " in stderr


def test_a_read_only_models_folder_interrupts_the_sweep(tmp_path: Path, data_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    spec = sweep_spec(tmp_path, data_dir)
    real = checkpoints.atomic_write
    calls = []

    def inject():
        def read_only(path: Path, write) -> None:
            calls.append(path)
            if len(calls) > 3:
                raise PermissionError(errno.EACCES, "Permission denied", str(path.with_suffix(".pt.tmp")))
            real(path, write)

        monkeypatch.setattr(checkpoints, "atomic_write", read_only)
        return lambda: monkeypatch.setattr(checkpoints, "atomic_write", real)

    stderr = interrupted_then_resumed(tmp_path, spec, monkeypatch, inject)
    assert "error: permission denied: " in stderr and "; make it writable, then: fmnist run" in stderr


def test_a_store_that_stops_taking_writes_interrupts_the_sweep(tmp_path: Path, data_dir: Path,
                                                               monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    spec = sweep_spec(tmp_path, data_dir)
    real = MlflowClient.log_batch
    batches = []

    def inject():
        def disk_full(self, run_id, metrics=(), params=(), tags=(), **kwargs):
            batches.append(run_id)
            if metrics and len(batches) > 12:  # past the first trial; closing the runs still works
                raise MlflowException("(sqlite3.OperationalError) database or disk is full")
            return real(self, run_id, metrics=metrics, params=params, tags=tags, **kwargs)

        monkeypatch.setattr(MlflowClient, "log_batch", disk_full)
        return lambda: monkeypatch.setattr(MlflowClient, "log_batch", real)

    stderr = interrupted_then_resumed(tmp_path, spec, monkeypatch, inject)
    assert stderr.startswith(f"error: no space left on device for the MLflow store {tmp_path / 'mlflow.db'}; "
                             "free space, then: fmnist run ")


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 2 MB tmpfs, where this machine lets the tests mount one (root on Linux); else the test is skipped."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_real_full_disk_interrupts_and_resumes(tmp_path: Path, data_dir: Path, small_disk: Path,
                                                monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load(sweep_spec(tmp_path, data_dir).read_text())
    raw["models_dir"] = str(small_disk / "models")
    raw["model"].update(filters=32, units1=64)  # a training state of about 0.3 MB
    spec = tmp_path / "faults.yaml"
    spec.write_text(yaml.safe_dump(raw))
    filler = small_disk / "filler"
    filler.write_bytes(bytes(2 * 2**20 - 150_000))
    result = runner.invoke(app, ["run", str(spec), "--quiet"])
    assert result.exit_code == 75, result.stderr
    assert result.stderr.startswith(f"error: no space left on device: {small_disk / 'models' / 'faults'}/")
    filler.unlink()
    assert runner.invoke(app, ["run", str(spec), "--resume", "--quiet"]).exit_code == 0
    _, trials = runs_of(tmp_path, "faults")
    assert sorted(t.info.status for t in trials) == ["FINISHED"] * 3


# --- signals ------------------------------------------------------------------------------------


class SignalsWhenCollected:
    """Sends a signal from a garbage-collection callback, where Python ignores the exception it raises."""

    def __init__(self, signum: int) -> None:
        self.signum = signum

    def __del__(self) -> None:
        os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_swallowed_where_it_landed_still_stops_the_sweep(tmp_path: Path, data_dir: Path, signum: int,
                                                                  code: int, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    spec = sweep_spec(tmp_path, data_dir)
    real = SweepRuns.log_epoch

    def log_epoch(self, record, metrics):
        real(self, record, metrics)
        SignalsWhenCollected(signum)  # collected at once: "Exception ignored in ... __del__"

    monkeypatch.setattr(SweepRuns, "log_epoch", log_epoch)
    result = runner.invoke(app, ["run", str(spec), "--quiet"])
    assert result.exit_code == code, result.stderr
    assert "interrupted; finished trials are kept" in result.stderr
    parents, trials = runs_of(tmp_path, "faults")
    assert parents[0].info.status == "KILLED" and [t.info.status for t in trials] == ["KILLED"]


def test_signals_land_at_every_moment(tmp_path: Path, data_dir: Path):
    """SIGINT and SIGTERM sent at many moments of a sweep (start-up, store creation, early in a trial, mid-epoch):
    each stops the process promptly, with the exit code of its signal."""
    raw = tiny_raw(data_dir, experiment="signals", train={"epochs": 50, "patience": None},
                   search={"max_evals": 50, "algo": "tpe", "space": {"train.lr": {"loguniform": [1e-3, 1e-2]}}})
    moments = [0.5, 3.0, 6.0, 9.0, 12.0, 15.0, 18.0, 21.0, 25.0, 30.0]
    processes = []
    for i, delay in enumerate(moments):
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        (folder / "spec.yaml").write_text(yaml.safe_dump(raw))
        process = subprocess.Popen([sys.executable, "-m", "fmnist_hpo", "run", "spec.yaml", "--quiet"], cwd=folder,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        processes.append((process, delay, signal.SIGINT if i % 2 else signal.SIGTERM))
    started = time.monotonic()
    for process, delay, signum in processes:
        time.sleep(max(0.0, started + delay - time.monotonic()))
        process.send_signal(signum)
    for process, delay, signum in processes:
        _, stderr = process.communicate(timeout=120)
        # before the handler is installed (imports) Python's own default applies: killed by the signal
        expected = {signal.SIGINT: (130, -signal.SIGINT), signal.SIGTERM: (143, -signal.SIGTERM)}[signum]
        assert process.returncode in expected, f"{signum!r} at {delay} s: exit {process.returncode}: {stderr[-2000:]}"
        assert "Traceback" not in stderr or process.returncode < 0, stderr[-2000:]


# --- serve-ui dies with its parent ------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def start_serve_ui(folder: Path, host: str) -> tuple[subprocess.Popen, str]:
    port = free_port(host if host != "::" else "::1")
    process = subprocess.Popen([sys.executable, "-m", "fmnist_hpo", "serve-ui", "--create", "--host", host,
                                "--port", str(port), "--tracking-uri", f"sqlite:///{folder / 'ui.db'}"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if line.startswith("MLflow UI at "):
            return process, line.split()[3].split("/#/")[0]
    pytest.fail(f"serve-ui did not start: exit {process.wait()}")


@pytest.mark.parametrize(("host", "ending"), [("::", signal.SIGKILL), ("127.0.0.1", signal.SIGHUP)])
def test_the_mlflow_server_dies_with_serve_ui(tmp_path: Path, host: str, ending: int):
    import socket

    if ":" in host and not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    process, url = start_serve_ui(tmp_path, host)
    assert answers(url) and (url.startswith("http://[::1]:") if host == "::" else True)
    process.send_signal(ending)  # kill -9, or the terminal closing
    process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while answers(url) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not answers(url), "the mlflow server outlived serve-ui"


def test_an_empty_host_is_refused_at_once(tmp_path: Path):
    result = runner.invoke(app, ["serve-ui", "--host", "", "--tracking-uri", f"sqlite:///{tmp_path / 'x.db'}"])
    assert result.exit_code == 2 and "--host '': give an address to bind" in result.stderr


def test_a_sweep_still_running_is_refused_without_advising_fresh(tmp_path: Path, data_dir: Path):
    from fmnist_hpo.config.sections import validate
    from fmnist_hpo.search.resume import ResumeError, ResumeMode, choose_parent
    from fmnist_hpo.search.trial_runs import SweepRuns
    from fmnist_hpo.tracking.writer import Tracker

    cfg = validate(tiny_raw(data_dir, models_dir=str(tmp_path / "models")))
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", cfg.experiment)
    runs = SweepRuns(cfg, tracker, "cpu")
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        runs.start_parent()
        tracker.set_tags(runs.parent_id, {"pid": str(alive.pid)})
        for mode in (ResumeMode.RESUME, ResumeMode.FRESH, ResumeMode.ASK):
            with pytest.raises(ResumeError) as refused:
                choose_parent(tracker, cfg, mode)
            assert f"still running (pid {alive.pid} on this host)" in str(refused.value)
            assert "--fresh" not in str(refused.value) and f"kill {alive.pid}" in str(refused.value)
    finally:
        alive.kill()


def test_a_bad_experiment_name_is_reported_once(tmp_path: Path):
    spec = Path(__file__).parents[1] / "configs" / "quick.yaml"
    result = runner.invoke(app, ["validate", str(spec), "--set", "experiment=a/b"])
    assert result.exit_code == 2 and result.stderr.count("must be 1-100 letters") == 1, result.stderr


def test_a_store_removed_mid_sweep_is_one_line(tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    spec = sweep_spec(tmp_path, data_dir)
    real = SweepRuns.close_finished

    def then_removed(self, record):
        real(self, record)
        (tmp_path / "mlflow.db").unlink(missing_ok=True)

    monkeypatch.setattr(SweepRuns, "close_finished", then_removed)
    result = runner.invoke(app, ["run", str(spec), "--quiet"])
    assert result.exit_code == 75 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: the MLflow store {tmp_path / 'mlflow.db'} was removed during the sweep; "
                                    "restore it, then: fmnist run ")


def test_an_interruption_swallowed_where_it_landed_is_not_printed(monkeypatch: pytest.MonkeyPatch):
    """It is on record and raised at the next safe point: no 'Exception ignored in ...' traceback for it."""
    import types

    from fmnist_hpo.search import interrupts

    printed = []
    monkeypatch.setattr(sys, "unraisablehook", printed.append)
    with interrupts.stop_on_signals():
        monkeypatch.setattr(interrupts, "_requested", signal.SIGTERM)
        sys.unraisablehook(types.SimpleNamespace(exc_value=KeyboardInterrupt()))
        other = types.SimpleNamespace(exc_value=ValueError("a real problem in a __del__"))
        sys.unraisablehook(other)
    assert printed == [other]  # only what was not an interruption on record
    assert sys.unraisablehook == printed.append  # put back when the block ends
