"""The SQLite store as a file: creation safe against kill -9 and a second creator, reading without write
access, one line for a store that is half-built, corrupt, foreign or locked."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_raw
from loguru import logger
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from fmnist_hpo.cli.app import app
from fmnist_hpo.tracking import store, writer

runner = CliRunner()


@pytest.fixture(scope="module")
def finished_store(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A folder holding a store with one finished sweep (experiment 'tiny') and its models/."""
    folder = tmp_path_factory.mktemp("finished")
    spec = folder / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_raw(data_dir, models_dir=str(folder / "models"))))
    result = runner.invoke(app, ["run", str(spec), "--quiet", "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}"])
    assert result.exit_code == 0, result.stderr
    return folder


def is_complete(db: Path) -> bool:
    client = MlflowClient(f"sqlite:///{db}")
    return client.get_experiment("0") is not None


def test_kill_9_during_store_creation_never_leaves_a_half_built_store(tmp_path: Path):
    db = tmp_path / "mlflow.db"
    code = f"from fmnist_hpo.tracking.store import open_client; open_client('sqlite:///{db}')"
    for delay in (0.0, 1.0, 2.5):  # into the schema migrations, which take seconds
        process = subprocess.Popen([sys.executable, "-c", code])
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".mlflow.db.creating-*")) and time.monotonic() < deadline:
            assert process.poll() is None, "finished before it could be killed"
            time.sleep(0.02)
        time.sleep(delay)
        process.kill()
        process.wait()
        assert not db.exists(), "the store appears only once it is complete"
    store.open_client(f"sqlite:///{db}")
    assert is_complete(db)
    assert not list(tmp_path.glob(".mlflow.db.creating-*")), "leftovers of killed creations are removed"


def test_an_outside_mlflow_client_creating_the_same_store_at_once(tmp_path: Path):
    db = tmp_path / "mlflow.db"
    outside = subprocess.Popen([sys.executable, "-c", "import sys; from mlflow.tracking import MlflowClient; "
                                f"MlflowClient('sqlite:///{db}').search_experiments()"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not db.exists() and time.monotonic() < deadline:  # it creates the file in place and migrates it
        time.sleep(0.02)
    store.open_client(f"sqlite:///{db}")  # waits for it rather than migrating the same file at once
    _, stderr = outside.communicate(timeout=120)
    assert outside.returncode == 0, stderr
    assert is_complete(db)


def half_built(folder: Path, source: Path) -> Path:
    db = folder / "half.db"
    shutil.copy(source, db)
    with sqlite3.connect(db) as con:
        con.execute("DROP TABLE alembic_version")
        con.execute("DELETE FROM runs")
    return db


def damaged_stores(folder: Path, good: Path) -> dict[str, tuple[Path, str]]:
    (folder / "truncated.db").write_bytes(good.read_bytes()[:8192])
    (folder / "garbage.db").write_bytes(b"not sqlite at all " * 100)
    with sqlite3.connect(folder / "notes.db") as con:
        con.execute("CREATE TABLE notes (text)")
    return {"truncated": (folder / "truncated.db", "corrupt or truncated"),
            "garbage": (folder / "garbage.db", "corrupt or truncated"),
            "half-built": (half_built(folder, good), "a half-built MLflow store"),
            "foreign": (folder / "notes.db", "an SQLite database that is not an MLflow store")}


@pytest.mark.parametrize("kind", ["truncated", "garbage", "half-built", "foreign"])
def test_commands_refuse_a_broken_store_in_one_line(kind: str, tmp_path: Path, finished_store: Path, data_dir: Path):
    db, message = damaged_stores(tmp_path, finished_store / "mlflow.db")[kind]
    before = db.read_bytes()
    uri = f"sqlite:///{db}"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_raw(data_dir, models_dir=str(tmp_path / "models"))))
    for args in (["analyze", "--all"], ["evaluate", "--experiment", "tiny"], ["register", "--experiment", "tiny"],
                 ["run", str(spec)]):
        result = runner.invoke(app, [*args, "--tracking-uri", uri])
        assert result.exit_code == 2, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
        assert message in result.stderr, result.stderr
    assert db.read_bytes() == before, "nothing is written into a store that is refused"


def test_reading_needs_no_write_access_and_makes_no_lock_file(tmp_path: Path, finished_store: Path):
    copy = tmp_path / "copy"
    shutil.copytree(finished_store, copy)
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(copy), str(read_only)], capture_output=True).returncode == 0
    if mounted and subprocess.run(["mount", "-o", "remount,ro,bind", str(read_only)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(read_only)], check=False)
        mounted = False
    folder = read_only if mounted else copy  # without mount rights: still no lock file, nothing written
    try:
        before = sorted(p.name for p in folder.iterdir())
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        result = runner.invoke(app, ["analyze", "--experiment", "tiny", "--tracking-uri", uri])
        assert result.exit_code == 0, result.stderr
        assert "tiny" in result.output
        assert sorted(p.name for p in folder.iterdir()) == before
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(read_only)], check=False)


def test_a_locked_store_is_waited_for_in_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """Another process holds the store with BEGIN EXCLUSIVE past SQLite's own 20 s wait: the write waits
    and succeeds, with one line saying so and none of MLflow's ERROR tracebacks."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = writer.Tracker(uri, "locked")
    run_id = tracker.start_run("r", params={}, tags={})
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sqlite3, sys, time; db = sqlite3.connect(sys.argv[1], isolation_level=None); "
                               "db.execute('BEGIN EXCLUSIVE'); print('held', flush=True); time.sleep(22)",
                               str(tmp_path / "mlflow.db")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    said: list[str] = []
    sink = logger.add(lambda message: said.append(str(message)), level="INFO")
    writer._say_once.cache_clear()
    try:
        tracker.set_tags(run_id, {"after": "the lock"})
    finally:
        logger.remove(sink)
        holder.wait()
    assert MlflowClient(uri).get_run(run_id).data.tags["after"] == "the lock"
    assert [line for line in said if "locked by another process; waiting" in line] == [said[0]]
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_a_registered_name_may_hold_a_quote(finished_store: Path):
    uri = f"sqlite:///{finished_store / 'mlflow.db'}"
    first = runner.invoke(app, ["register", "--experiment", "tiny", "--name", "o'neil's cnn", "--tracking-uri", uri])
    assert first.exit_code == 0, first.stderr
    again = runner.invoke(app, ["register", "--experiment", "tiny", "--name", "o'neil's cnn", "--tracking-uri", uri])
    assert again.exit_code == 0 and again.output.startswith("already registered as o'neil's cnn version 1")


def test_evaluate_removes_the_checkpoint_it_downloaded(tmp_path: Path, finished_store: Path, data_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch):
    import tempfile

    copy = tmp_path / "copy"
    shutil.copytree(finished_store, copy, ignore=shutil.ignore_patterns("models"))  # only the artifact is left
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.chdir(tmp_path)
    models = finished_store / "models"
    models.rename(finished_store / "models.away")  # the run's models_dir param names it
    try:
        result = runner.invoke(app, ["evaluate", "--experiment", "tiny", "--data-root", str(data_dir),
                                     "--tracking-uri", f"sqlite:///{copy / 'mlflow.db'}"])
    finally:
        (finished_store / "models.away").rename(models)
    assert result.exit_code == 0, result.stderr
    assert list(scratch.iterdir()) == []
