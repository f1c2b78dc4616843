"""The tracking store itself: which URI, creating and opening it, and what its failures mean.

A new SQLite store is built beside its place and linked in (sqlite_store.py); an existing one is
looked at before MLflow opens it, so a half-built, corrupt or foreign file is one line, not a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from loguru import logger
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fmnist_hpo.errors import FmnistError, MachineFailure, first_line
from fmnist_hpo.faults import machine_failure
from fmnist_hpo.tags import ROLE, Role
from fmnist_hpo.tracking import sqlite_store

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class TrackingError(FmnistError):
    """The tracking store cannot be opened or written."""


class StoreFailure(TrackingError, MachineFailure):
    """The store stopped taking writes mid-sweep (disk full, read-only, removed, locked past the wait, a server
    gone): an interruption of the sweep, to resume once fixed, never a failed trial."""


# SQLite's words for a store that stopped taking writes -> (what happened, what the user does about it)
_STORE_FAULTS = {
    "database or disk is full": ("no space left on device for the MLflow store {store}", "free space"),
    "readonly database": ("the MLflow store {store} is read-only", "make it writable"),
    "unable to open database file": ("cannot open the MLflow store {store} (removed, or its folder not writable)",
                                     "restore it"),
    "no such table": ("the MLflow store {store} was removed or replaced during the sweep", "restore it"),
    "disk i/o error": ("disk I/O error on the MLflow store {store}", "check the disk"),
    "database disk image is malformed": ("the MLflow store {store} is corrupt", "restore it from a backup"),
    "file is not a database": ("the MLflow store {store} is corrupt", "restore it from a backup"),
    "database is locked": ("the MLflow store {store} stayed locked by another process", "let that process finish"),
}


def store_failure(tracking_uri: str, exc: BaseException) -> MachineFailure | None:
    """The machine's failure behind an exception of a store write, or None (then it is a bug, not the machine)."""
    if is_unreachable(exc):
        return StoreFailure(f"the tracking server {tracking_uri} does not answer", "start it again")
    text = str(exc).lower()
    store = tracking_uri.removeprefix("sqlite:///")
    if tracking_uri.startswith("sqlite:///") and "database" in text and not Path(store).exists():
        return StoreFailure(f"the MLflow store {store} was removed during the sweep", "restore it")  # SQLite: 'readonly'
    for words, (cause, fix) in _STORE_FAULTS.items():
        if words in text:
            return StoreFailure(cause.format(store=store), fix)
    return machine_failure(exc)


def resolve_tracking_uri(configured: str | None) -> str:
    """The URI to use, with a relative SQLite path made absolute (MLflow caches stores by URI text)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).expanduser().absolute()}"
    return uri


def quiet_mlflow() -> None:
    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # it logs every SQLite error with its traceback before raising it; we retry, wait or report it in one line
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def check_sqlite_location(uri: str) -> None:
    """A one-line error now, rather than a SQLAlchemy traceback later, for an unwritable store."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///")).expanduser()
    folder = path.parent if str(path.parent) else Path(".")
    if path.exists() and not os.access(path, os.W_OK):
        raise TrackingError(f"{path}: the MLflow store is not writable")
    if not path.exists() and not (folder.is_dir() and os.access(folder, os.W_OK)):
        raise TrackingError(f"{folder}: cannot create the MLflow store {path.name} here (missing or not writable)")


@contextlib.contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at uri for a moment; set_tracking_uri also writes
    MLFLOW_TRACKING_URI into the environment, which must not leak into later runs.

    An unset URI is restored as unset (None): get_tracking_uri() would return the default made
    absolute for the current folder, and pinning that would send later calls from another folder
    to this folder's store.
    """
    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    saved_uri = mlflow.get_tracking_uri() if mlflow.tracking.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_uri)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def open_client(tracking_uri: str) -> MlflowClient:
    """A client whose store exists, for writing. A new SQLite store is built by one process at a time, in a
    temporary file linked into place when complete (sqlite_store.py), so that neither a kill -9 nor another
    MLflow client building the same file at once can leave a half-built schema behind."""
    if not tracking_uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri)
    from filelock import FileLock

    db = Path(tracking_uri.removeprefix("sqlite:///"))
    head = _schema_head()
    with FileLock(str(db.parent / f".{db.name}.lock"), timeout=120):
        state, runs = _settled(db, head)
        new = state in (sqlite_store.State.MISSING, sqlite_store.State.EMPTY)
        if new and not sqlite_store.build_beside(db, _build_store, replace=state is sqlite_store.State.EMPTY):
            state, runs = _settled(db, head)  # another MLflow client put its own there meanwhile
        _refuse(db, state, runs)
        client = MlflowClient(tracking_uri)
        client.search_experiments(max_results=1)
    return client


def open_reader(tracking_uri: str) -> MlflowClient:
    """A client of an existing store, for reading: no lock file, no creation, no write access needed."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        if not db.is_file():
            raise TrackingError(f"{tracking_uri}: no MLflow store here yet (run `fmnist run` first)")
        _refuse(db, *_inspected(db, _schema_head()), reading=True)
    try:
        client = MlflowClient(tracking_uri)
        client.search_experiments(max_results=1)
    except Exception as exc:  # MLflow, SQLAlchemy and OS errors of a store that cannot be read
        raise TrackingError(f"{tracking_uri}: cannot read the MLflow store ({first_line(exc)})") from None
    return _ReadingClient(client)


class _ReadingClient:
    """An MlflowClient whose failures (a store locked past SQLite's wait, or broken) are one-line TrackingErrors."""

    def __init__(self, client: MlflowClient) -> None:
        self._client = client
        self.tracking_uri = client.tracking_uri

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            except MlflowException as exc:
                failure = store_failure(self.tracking_uri, exc)
                if failure is None:
                    raise
                raise TrackingError(str(failure)) from None

        return call



@functools.cache  # parsing MLflow's migration scripts takes a moment
def _schema_head() -> str:
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def _build_store(uri: str) -> None:
    client = MlflowClient(uri)
    client.search_experiments(max_results=1)  # builds every table, and the default experiment
    client._tracking_client.store.engine.dispose()  # its file is about to be renamed


def _inspected(db: Path, head: str) -> tuple[sqlite_store.State, int]:
    try:
        return sqlite_store.inspect(db, head)
    except sqlite_store.StoreFileError as exc:
        raise TrackingError(str(exc)) from None


def _settled(db: Path, head: str) -> tuple[sqlite_store.State, int]:
    try:
        return sqlite_store.settle(db, head, logger.info)
    except sqlite_store.StoreFileError as exc:
        raise TrackingError(str(exc)) from None


def _refuse(db: Path, state: sqlite_store.State, runs: int, reading: bool = False) -> None:
    problem = sqlite_store.refusal(db, state, runs)
    if problem is None and reading and state is sqlite_store.State.EMPTY:
        problem = f"{db}: an empty file, not an MLflow store yet (run `fmnist run` first)"
    if problem is not None:
        raise TrackingError(problem)


def create_store(tracking_uri: str) -> None:
    """Create an empty SQLite store (MLflow's tables, no runs) so a server can start on it."""
    check_sqlite_location(tracking_uri)
    try:
        open_client(tracking_uri)
    except Exception as exc:  # SQLAlchemy and OS errors
        raise TrackingError(f"{tracking_uri}: cannot create the MLflow store ({first_line(exc)})") from None


def role_filter(role: Role) -> str:
    """MLflow's search filter for the runs of one role."""
    return f"tags.`{ROLE}` = '{role}'"


def is_unreachable(exc: BaseException) -> bool:
    """A tracking server that is down or went away (MLflow has already retried the request)."""
    text = str(exc)
    return any(sign in text for sign in ("Max retries exceeded", "Failed to establish a new connection",
                                         "Connection refused", "Connection aborted", "RemoteDisconnected"))
