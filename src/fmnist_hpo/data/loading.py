"""A dataset's four IDX files: found under the data root (or downloaded there) and read into uint8 arrays.

The whole dataset is 55 MB as uint8, so it is read once; see data.splits for what the trials take of it.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fmnist_hpo.data.datasets import DatasetInfo, dataset_named
from fmnist_hpo.data.idx import check_images, check_labels, read_idx
from fmnist_hpo.errors import DataError

if TYPE_CHECKING:
    from fmnist_hpo.config.sections import DataConfig


@dataclass(frozen=True)
class Dataset:
    train_images: np.ndarray  # (60000, 28, 28) uint8
    train_labels: np.ndarray  # (60000,) int64
    test_images: np.ndarray
    test_labels: np.ndarray
    info: DatasetInfo  # which dataset these are


def data_root(cfg: DataConfig) -> Path:
    return Path(cfg.root or os.environ.get("FMNIST_DATA_DIR") or "data").expanduser()


def find_files(root: Path, info: DatasetInfo) -> dict[str, Path] | None:
    """info's four files under root (plain or .gz, or where torchvision puts them); None if any is missing."""
    found = {}
    downloaded = root / info.torchvision_class / "raw"
    for key, name in info.files.items():
        candidates = [root / name, root / f"{name}.gz", downloaded / name, downloaded / f"{name}.gz"]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            return None
        found[key] = path
    return found


def download(root: Path, info: DatasetInfo) -> None:
    """Fetch the dataset with torchvision into root/<its class>/raw; on failure, say why and remove the
    folders this call created (left empty: torchvision opens a file only once a download has started)."""
    folder = root / info.torchvision_class
    created = [f for f in (folder / "raw", folder, root, *root.parents) if not f.exists()]
    printed = io.StringIO()
    try:
        from torchvision import datasets

        root.mkdir(parents=True, exist_ok=True)
        with contextlib.redirect_stdout(printed):
            for train in (True, False):
                getattr(datasets, info.torchvision_class)(str(root), train=train, download=True)
    except Exception as exc:  # torchvision raises URLError, RuntimeError, OSError...
        _remove_empty(created)
        raise DataError(
            f"{info.title} is not in {root} and could not be downloaded "
            f"({_failure_reason(exc, printed.getvalue())}); put {', '.join(f + '.gz' for f in info.files.values())} "
            "there or point FMNIST_DATA_DIR / data.root at them"
        ) from None


def _remove_empty(folders: list[Path]) -> None:
    """Remove folders (deepest first) that are empty; one that holds anything is left alone."""
    for folder in folders:
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            return


def _failure_reason(exc: BaseException, printed: str) -> str:
    """One line: the exception's message, plus the last mirror's error, which torchvision only prints."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    printed_lines = [line.strip() for line in printed.splitlines()]
    failures = [after for before, after in itertools.pairwise(printed_lines) if before.startswith("Failed to download")]
    if failures and failures[-1]:
        lines.append(failures[-1])
    return ": ".join(lines)[:300]


def missing_data(root: Path, info: DatasetInfo) -> DataError:
    return DataError(
        f"{info.title} is not in {root}; put {', '.join(info.files.values())} (gzipped or not) there, "
        "or point FMNIST_DATA_DIR / data.root at them (or set data.download: true)"
    )


def load_dataset(cfg: DataConfig) -> Dataset:
    info = dataset_named(cfg.dataset)
    root = data_root(cfg)
    paths = find_files(root, info)
    if paths is None:
        if not cfg.download:
            raise missing_data(root, info)
        download(root, info)
        paths = find_files(root, info)
        if paths is None:
            raise DataError(f"download finished but the files are still missing from {root}")
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for part in ("train", "test"):
        images, image_path = arrays[f"{part}_images"], paths[f"{part}_images"]
        check_images(images, image_path, info)
        check_labels(arrays[f"{part}_labels"], paths[f"{part}_labels"], images, image_path, info)
    return Dataset(
        train_images=arrays["train_images"],
        train_labels=arrays["train_labels"].astype(np.int64),
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"].astype(np.int64),
        info=info,
    )
