"""Where a run came from: the code, the environment and the process behind it, and what its model needs."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess

import mlflow
import numpy as np

from fmnist_hpo.tags import GIT_COMMIT, HOST, PID, PYTHON_VERSION, TORCH_VERSION


@functools.cache  # one process, one commit: not a subprocess per trial run
def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment_tags() -> dict[str, str]:
    """The tags every run carries about the environment that wrote it."""
    import torch

    tags = {TORCH_VERSION: torch.__version__, PYTHON_VERSION: platform.python_version(), HOST: platform.node()}
    commit = git_commit()
    if commit:
        tags[GIT_COMMIT] = commit
    return tags


def model_requirements() -> list[str]:
    """What loading a logged pt2 model needs, pinned to this environment (inferring them reloads the model)."""
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
            f"numpy=={np.__version__}"]


def split_fingerprint(files_digest: str, split: str, split_seed: int, size: int) -> str:
    """One split's digest: the IDX files', the split's name, seed and size (MLflow keeps a dataset per digest)."""
    text = json.dumps([files_digest, split, split_seed, size])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def alive_elsewhere(sweep_tags: dict[str, str]) -> bool:
    """Whether the process that ran a sweep is still running on this host."""
    if sweep_tags.get(HOST) != os.uname().nodename or not sweep_tags.get(PID, "").isdigit():
        return False
    pid = int(sweep_tags[PID])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

