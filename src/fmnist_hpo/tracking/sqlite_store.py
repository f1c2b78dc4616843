"""An SQLite MLflow store as a file: what state it is in, read with SQLite alone and without writing to it.

MLflow builds a new store with a few dozen schema migrations, several seconds in all. A process
killed meanwhile, or two processes building the same file at once, leave a half-built schema that
every later command trips over ("table secrets already exists"). So fmnist builds a new store in a
temporary file beside it and links it into place (store.open_client), and looks at an existing
file before MLflow opens it: a complete store is used, one being built elsewhere is waited for, and
a half-built, corrupt or foreign file is refused with one line that says what to do.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path

from fmnist_hpo.errors import FmnistError

MLFLOW_TABLES = frozenset({"experiments", "runs", "metrics", "params", "tags"})
SETTLE_SECONDS = 3.0  # a store whose file stops changing this long is not being built by anyone


class StoreFileError(FmnistError):
    """An SQLite file that cannot be used as an MLflow store (half-built, corrupt, locked, not MLflow's)."""


class State(Enum):
    MISSING = "missing"  # no file
    EMPTY = "empty"  # a file without tables (`touch mlflow.db`, or another process just began building it)
    COMPLETE = "complete"  # MLflow's tables at the schema version this MLflow expects
    PARTIAL = "partial"  # some of MLflow's tables: being built, half-built, or older than this MLflow
    FOREIGN = "foreign"  # an SQLite database of something else


def inspect(path: Path, head_revision: str, timeout: float = 20.0) -> tuple[State, int]:
    """(state of the store file, how many runs it holds); opens it read-only, never creating anything."""
    if not path.exists():
        return State.MISSING, 0
    if path.stat().st_size == 0:
        return State.EMPTY, 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout)) as db:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            runs = db.execute("SELECT count(*) FROM runs").fetchone()[0] if "runs" in tables else 0
            revision = db.execute("SELECT version_num FROM alembic_version").fetchone() \
                if "alembic_version" in tables else None
    except sqlite3.Error as exc:
        raise StoreFileError(_unreadable(path, exc)) from None
    if not tables:
        return State.EMPTY, 0
    if not tables & MLFLOW_TABLES:
        return State.FOREIGN, 0
    complete = tables >= MLFLOW_TABLES and revision is not None and revision[0] == head_revision
    return (State.COMPLETE if complete else State.PARTIAL), runs


def _unreadable(path: Path, exc: sqlite3.Error) -> str:
    text = str(exc)
    if "locked" in text:
        return f"{path}: the MLflow store is locked by another process; try again when it is done"
    if "not a database" in text or "malformed" in text:
        return f"{path}: not a readable MLflow store (corrupt or truncated: {text}); restore it from a backup"
    return f"{path}: cannot read the MLflow store ({text})"


def refusal(path: Path, state: State, runs: int) -> str | None:
    """Why a store in this state cannot be opened, with what to do about it; None when it can."""
    uri = f"sqlite:///{path}"
    if state is State.FOREIGN:
        return f"{path}: an SQLite database that is not an MLflow store; give another --tracking-uri"
    if state is State.PARTIAL and runs == 0:
        return (f"{path}: a half-built MLflow store (its creation was interrupted) holding no runs; "
                f"remove it (rm {path}) and run again")
    if state is State.PARTIAL:
        return (f"{path}: the MLflow store's schema is not the one this MLflow expects (older, or an upgrade was "
                f"interrupted); back it up, then run: mlflow db upgrade {uri}")
    return None


def settle(path: Path, head_revision: str, say: Callable[[str], None], timeout: float = 120.0) -> tuple[State, int]:
    """The store's state once nobody is building it: waits while the file keeps changing (another process
    creating it), returns as soon as it is complete or has not changed for SETTLE_SECONDS."""
    deadline = time.monotonic() + timeout
    state, runs = inspect(path, head_revision)
    last, still_since, said = _signature(path), time.monotonic(), False
    while state in (State.PARTIAL, State.EMPTY) and time.monotonic() < deadline:
        if time.monotonic() - still_since > SETTLE_SECONDS:
            break
        time.sleep(0.2)
        now = _signature(path)
        if now != last:
            last, still_since = now, time.monotonic()
            if not said:
                say(f"{path}: another process is creating this MLflow store; waiting for it")
                said = True
        state, runs = inspect(path, head_revision)
    return state, runs


def _signature(path: Path) -> tuple[int, int]:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return -1, -1
    try:  # the journal comes and goes with each of the builder's transactions
        journal = path.with_name(path.name + "-journal").stat().st_size
    except FileNotFoundError:
        journal = -1
    return stat.st_mtime_ns, stat.st_size + journal


def leftover_builds(path: Path) -> list[Path]:
    """Temporary stores of creations that were killed before linking theirs into place."""
    return sorted(path.parent.glob(f".{path.name}.creating-*"))


def build_beside(path: Path, build: Callable[[str], None], replace: bool = False) -> bool:
    """Build a new store in a temporary file next to path and link it into place; False if another process
    put a store there first (theirs is kept). replace: path is an empty file, to be replaced whole.
    Call it holding the store's creation lock."""
    for stale in leftover_builds(path):  # under the lock, nobody else is building one
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.creating-{time.time_ns()}")
    try:
        build(f"sqlite:///{tmp}")
        if replace:
            tmp.replace(path)
            return True
        return _link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_name(tmp.name + "-journal").unlink(missing_ok=True)


def _link(source: Path, target: Path) -> bool:
    """Put source at target unless target exists: a hard link is that test and the move in one step."""
    try:
        os.link(source, target)
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: the small race of a check then a rename
        if target.exists():
            return False
        os.replace(source, target)
    return True
