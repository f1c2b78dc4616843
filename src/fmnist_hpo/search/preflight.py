"""What a run will use on this machine, checked before anything is trained or written.

`preflight(cfg)` resolves `auto` and `null` settings to the device, data folder, store and checkpoint
folder a run would use and raises the error the run would hit at once (no CUDA, no data files and
no download, an unwritable store or checkpoint folder), so `validate` and `--dry-run` fail where
`run` would. It reads and creates nothing: a folder that does not exist yet is only checked for
being creatable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fmnist_hpo.data.datasets import dataset_named
from fmnist_hpo.data.loading import data_root, find_files, missing_data
from fmnist_hpo.errors import DataError, OutputError
from fmnist_hpo.files import models_folder
from fmnist_hpo.training.fits import check_fits

if TYPE_CHECKING:
    from fmnist_hpo.config.sections import Config


@dataclass(frozen=True)
class Resolved:
    """The settings a run actually uses, with `auto` and `null` resolved for this machine."""

    device: str  # cpu, cuda or mps
    precision: str  # fp32, bf16 or fp16 (autocast dtype)
    data_root: Path  # folder holding (or about to receive) the IDX files
    data_present: bool  # False: the files are missing and will be downloaded there
    tracking_uri: str  # the MLflow store, a relative SQLite path made absolute
    checkpoint_dir: Path  # models_dir/experiment, absolute

    def describe(self) -> list[str]:
        data = "" if self.data_present else " (missing: will be downloaded there)"
        return [f"device: {self.device} ({self.precision})", f"data: {self.data_root}{data}",
                f"store: {self.tracking_uri}", f"checkpoints: {self.checkpoint_dir}"]


def preflight(cfg: Config) -> Resolved:
    """The resolved settings of cfg, or the DeviceError, DataError, TrackingError or OutputError a run
    would raise at once."""
    device, precision = resolve_compute(cfg)
    check_fits(cfg, torch.device(device))
    root, present = check_data(cfg)
    tracking_uri = check_store(cfg.mlflow.tracking_uri)
    checkpoint_dir = models_folder(cfg.models_dir, cfg.experiment).absolute()
    check_creatable(checkpoint_dir, "the checkpoint folder")
    return Resolved(device, precision, root, present, tracking_uri, checkpoint_dir)


def resolve_compute(cfg: Config) -> tuple[str, str]:
    from fmnist_hpo.training.device import precision_name, resolve_device

    device = resolve_device(cfg.train.device)
    return device.type, precision_name(cfg.train.precision, device)


def check_data(cfg: Config) -> tuple[Path, bool]:
    """(data folder, whether the four files are there); missing files are an error without data.download."""
    root, info = data_root(cfg.data).absolute(), dataset_named(cfg.data.dataset)
    if find_files(root, info) is not None:
        return root, True
    if not cfg.data.download:
        raise missing_data(root, info)
    try:
        check_creatable(root, "the data folder")
    except OutputError as exc:
        raise DataError(f"{info.title} is not in {root} and cannot be downloaded there: {exc}") from None
    return root, False


def check_store(configured_uri: str | None) -> str:
    from fmnist_hpo.tracking.store import check_sqlite_location, resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(configured_uri)
    check_sqlite_location(tracking_uri)
    return tracking_uri


def check_creatable(folder: Path, what: str) -> None:
    """folder is a writable folder, or the nearest existing folder above it is writable (so it can be made)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise OutputError(f"{folder}: cannot create {what} ({existing} is a file, not a folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "is not writable" if existing == folder else f"cannot be created ({existing} is not writable)"
        raise OutputError(f"{folder}: {what} {where}")
