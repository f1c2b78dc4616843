"""A finished trial's checkpoint, checked where it is used and restored from its run's artifact copy.

Every finished trial's checkpoint is written twice: under models/ and as its run's artifact. When the
local file is damaged (or gone) the intact artifact copy is put back in its place, with a warning;
when there is no intact copy, the caller learns it through LostCheckpoint, whose message says what
the user can do.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from loguru import logger

from fmnist_hpo.files import atomic_write
from fmnist_hpo.training.checkpoints import CheckpointError, read_checkpoint

FetchCopy = Callable[[Path], Path | None]  # download the run's checkpoint artifact into a folder; None if it has none


class LostCheckpoint(CheckpointError):
    """A checkpoint that does not load, with no intact copy in its run's artifacts."""

    def __init__(self, message: str, damage: str) -> None:
        super().__init__(message)
        self.damage = damage  # what is wrong with the local file


def usable_checkpoint(local: Path, run_id: str, fetch_copy: FetchCopy) -> Path:
    """local, once it loads with weights_only=True: as it is, or restored from the run's artifact copy."""
    try:
        read_checkpoint(local)
        return local
    except CheckpointError as exc:
        damage = str(exc)
    with tempfile.TemporaryDirectory(prefix="fmnist-restore-") as folder:
        copy = fetch_copy(Path(folder))
        if copy is not None:
            try:
                read_checkpoint(copy)
            except CheckpointError:
                copy = None
        if copy is None:
            raise LostCheckpoint(f"{damage}; run {run_id} has no intact copy in its artifacts either: that trial "
                                 "must be trained again (`fmnist run SPEC --resume` does so for an unfinished sweep, "
                                 "`--fresh` reruns a finished one)", damage)
        atomic_write(local, lambda tmp: shutil.copyfile(copy, tmp))
    logger.warning(f"{damage}; restored it from run {run_id}'s artifact copy")
    return local
