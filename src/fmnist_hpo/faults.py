"""Whose failure is it: the machine's (an interruption) or the trial's (a FAILED run the search learns from).

A trial fails by itself when its loss turns NaN, its model raises or CUDA runs out of memory. The
machine fails it when a file of ours cannot be written (a full disk, a read-only or vanished folder)
or the store stops taking writes; retrying later, after a fix, trains the same point to the same result.
"""

from __future__ import annotations

import errno

from fmnist_hpo.errors import MachineFailure

_OS_CAUSES = {
    errno.ENOSPC: ("no space left on device", "free space"),
    errno.EDQUOT: ("disk quota exceeded", "free space"),
    errno.EROFS: ("read-only file system", "make it writable"),
    errno.EACCES: ("permission denied", "make it writable"),
    errno.EPERM: ("operation not permitted", "make it writable"),
    errno.ENOENT: ("no such file or folder", "restore the folder"),
    errno.EIO: ("input/output error", "check the disk"),
}


def machine_failure(exc: BaseException) -> MachineFailure | None:
    """The machine's failure behind exc, or None when exc is the trial's own."""
    if isinstance(exc, MachineFailure):
        return exc
    if isinstance(exc, OSError):
        cause, fix = _OS_CAUSES.get(exc.errno, (exc.strerror or type(exc).__name__, "fix it"))
        return MachineFailure(f"{cause}: {exc.filename}" if exc.filename else cause, fix)
    return None
