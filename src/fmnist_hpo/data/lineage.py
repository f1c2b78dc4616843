"""Where a run's data came from: a fingerprint of the dataset's IDX files, for MLflow's dataset tracking."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path
from typing import IO, TYPE_CHECKING

from fmnist_hpo.data.loading import find_files
from fmnist_hpo.errors import DataError

if TYPE_CHECKING:
    from fmnist_hpo.data.datasets import DatasetInfo

_CHUNK = 1 << 20


def idx_digest(root: Path, info: DatasetInfo) -> str:
    """SHA-256 (hex, 32 characters) of the contents of info's four IDX files in root.

    The decompressed bytes are hashed, so the gzipped and the plain files of the same data agree.
    """
    paths = find_files(root, info)
    if paths is None:
        raise DataError(f"{root}: not all of {info.title}'s {', '.join(info.files.values())} are here")
    digest = hashlib.sha256()
    for key in sorted(paths):
        digest.update(key.encode())
        with _open(paths[key]) as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()[:32]


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")
