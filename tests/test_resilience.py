"""Interruptions, crashes, concurrent sweeps and corrupt files: nothing finished is lost."""

from __future__ import annotations

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
from mlflow.tracking import MlflowClient

from fmnist_hpo.config.sections import validate
from fmnist_hpo.data.loading import load_dataset
from fmnist_hpo.data.splits import make_splits
from fmnist_hpo.files import atomic_write
from fmnist_hpo.training.checkpoints import (
    CheckpointError,
    read_checkpoint,
    read_training_state,
    save_training_state,
)
from fmnist_hpo.training.hooks import FitHooks
from fmnist_hpo.training.loop import train_and_test

CPU = torch.device("cpu")


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("scheduler", ["step", "onecycle"])
def test_a_resumed_trial_ends_with_the_same_metrics(data_dir: Path, tmp_path: Path, scheduler: str):
    cfg = validate(tiny_raw(data_dir, train={"epochs": 4, "scheduler": scheduler, "step_size": 1},
                            data={"augment_flip": True}))
    splits = make_splits(load_dataset(cfg.data), cfg.data, CPU)
    straight = train_and_test(cfg, splits, CPU)

    state_file = tmp_path / "trial.state.pt"

    class SaveThenDie(FitHooks):
        def epoch_done(self, metrics, state) -> None:
            save_training_state(state_file, state())
            if metrics.epoch == 1:
                raise Interrupted

    with pytest.raises(Interrupted):
        train_and_test(cfg, splits, CPU, SaveThenDie())
    resumed = train_and_test(cfg, splits, CPU, resume=read_training_state(state_file))
    assert [m.val_loss for m in resumed.fit.history] == [m.val_loss for m in straight.fit.history]
    assert resumed.test_accuracy == straight.test_accuracy
    assert resumed.fit.kept_epoch == straight.fit.kept_epoch


def test_a_crash_mid_write_keeps_the_previous_file(tmp_path: Path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"version 1")

    def write_half_then_crash(tmp: Path) -> None:
        tmp.write_bytes(b"vers")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, write_half_then_crash)
    assert target.read_bytes() == b"version 1"
    assert list(tmp_path.iterdir()) == [target]


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_corrupt_or_malicious_files_are_refused_by_name(tmp_path: Path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(CheckpointError, match=r"garbage\.pt: not a loadable checkpoint"):
        read_checkpoint(garbage)
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "model_config": RunsCode()}, evil)
    with pytest.raises(CheckpointError, match=r"evil\.pt: not a loadable checkpoint"):
        read_checkpoint(evil)
    with pytest.raises(CheckpointError, match=r"garbage\.pt: corrupt training state"):
        read_training_state(garbage)


# --- whole sweeps in subprocesses -------------------------------------------------------------


def write_spec(folder: Path, data_dir: Path, experiment: str = "crash", max_evals: int = 3, epochs: int = 6) -> Path:
    raw = tiny_raw(data_dir, experiment=experiment,
                   train={"epochs": epochs, "patience": None},
                   search={"max_evals": max_evals, "algo": "random",
                           "space": {"train.lr": {"loguniform": [1e-3, 1e-2]}}})
    path = folder / f"{experiment}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def start(spec: Path, cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fmnist_hpo", "run", str(spec), "--quiet", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def resume(spec: Path, cwd: Path) -> None:
    resumed = subprocess.run([sys.executable, "-m", "fmnist_hpo", "run", str(spec), "--resume", "--quiet"],
                             cwd=cwd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr


def wait_for_mid_trial(cwd: Path, experiment: str, process: subprocess.Popen, timeout: float = 180) -> None:
    """Until one trial has finished and the next has saved an epoch."""
    folder = cwd / "models" / experiment
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the sweep ended before it could be interrupted: {process.communicate()}")
        states = list(folder.glob("*.state.pt"))
        finished = [p for p in folder.glob("*.pt") if not p.name.endswith(".state.pt")]
        if states and finished:
            return
        time.sleep(0.05)
    pytest.fail("no trial reached the point to interrupt")


def trials_in(cwd: Path, experiment: str):
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("fmnist.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("fmnist.role") == "trial"]
    return parents, children


def test_kill_9_then_resume_completes_exactly_max_evals(tmp_path: Path, data_dir: Path):
    spec = write_spec(tmp_path, data_dir)
    process = start(spec, tmp_path)
    wait_for_mid_trial(tmp_path, "crash", process)
    process.kill()
    process.wait()

    resume(spec, tmp_path)
    parents, children = trials_in(tmp_path, "crash")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.info.status for r in children) == ["FINISHED"] * 3
    assert sorted(int(r.data.tags["trial"]) for r in children) == [0, 1, 2]
    continued = [r for r in children if "resumed" in r.data.tags]
    assert len(continued) == 1 and continued[0].data.metrics["epochs_run"] == 6
    assert not list((tmp_path / "models" / "crash").glob("*.state.pt"))


def test_sigint_exits_130_and_leaves_a_resumable_sweep(tmp_path: Path, data_dir: Path):
    spec = write_spec(tmp_path, data_dir, experiment="sigint")
    process = start(spec, tmp_path)
    wait_for_mid_trial(tmp_path, "sigint", process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "--resume" in stderr and "Traceback" not in stderr
    parents, children = trials_in(tmp_path, "sigint")
    assert parents[0].info.status == "KILLED"
    assert "RUNNING" not in {r.info.status for r in children}

    resume(spec, tmp_path)
    parents, children = trials_in(tmp_path, "sigint")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.info.status for r in children) == ["FINISHED"] * 3


def test_two_sweeps_share_one_store(tmp_path: Path, data_dir: Path):
    specs = [write_spec(tmp_path, data_dir, experiment=name, max_evals=3, epochs=2) for name in ("left", "right")]
    processes = [start(spec, tmp_path) for spec in specs]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
    for name in ("left", "right"):
        parents, children = trials_in(tmp_path, name)
        assert parents[0].info.status == "FINISHED"
        assert sorted(r.info.status for r in children) == ["FINISHED"] * 3
        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        assert all(len(client.get_metric_history(r.info.run_id, "val_loss")) == 2 for r in children)
