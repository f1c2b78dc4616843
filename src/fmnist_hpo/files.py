"""Files written whole or not at all, and where a trial's files live: models_dir/experiment/run_id.pt."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write(path: Path, write: Any) -> None:
    """Call write(tmp_path), then rename tmp into place: a crash mid-write keeps the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except OSError as exc:  # a full disk or a read-only folder: name the file being written, not its temporary
        Path(tmp).unlink(missing_ok=True)
        if exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def models_folder(models_dir: str | Path, experiment: str) -> Path:
    """The folder of an experiment's checkpoints (and of its trials' training states while they run);
    `~` is the user's home here as in preflight's check, not a folder named ~."""
    return Path(models_dir).expanduser() / experiment


def checkpoint_file(folder: Path, run_id: str) -> Path:
    """A trial's checkpoint in its experiment's models folder."""
    return folder / f"{run_id}.pt"


def state_file(folder: Path, run_id: str) -> Path:
    """A trial's whole training state, rewritten after every epoch until the trial ends."""
    return folder / f"{run_id}.state.pt"
