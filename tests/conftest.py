"""Shared fixtures: tiny synthetic Fashion-MNIST-shaped IDX files that the tests write themselves."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

# The tests' models are tiny and several processes (sweeps, servers, Ray workers) share CI's two cores: a second
# torch thread there costs more than it gives (a tiny training step takes several times the CPU). Set before
# torch loads, here and in every subprocess the tests start, which inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

from fmnist_hpo.data.datasets import FILES

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

N_TRAIN, N_TEST = 400, 100


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    """Write array (uint8) as an IDX file: magic 0x0000 08 ndim, big-endian dims, raw bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    blob = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(blob, compresslevel=1))
    else:
        path.write_bytes(blob)
    return path


def synthetic_images(labels: np.ndarray, seed: int) -> np.ndarray:
    """Each class is a stripe texture (orientation and period), so a small CNN can learn it."""
    rng = np.random.default_rng(seed)
    grid = np.arange(28)
    images = rng.integers(0, 60, size=(len(labels), 28, 28)).astype(np.int32)
    for i, c in enumerate(labels):
        period = 2 + (c % 5)
        stripes = (grid // period) % 2 == 0
        mask = stripes[:, None] if c < 5 else stripes[None, :]
        images[i] += np.where(np.broadcast_to(mask, (28, 28)), 170, 0)
    return np.clip(images, 0, 255).astype(np.uint8)


def write_dataset(folder: Path, n_train: int = N_TRAIN, n_test: int = N_TEST, compress: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    train_labels = (np.arange(n_train) % 10).astype(np.uint8)
    test_labels = (np.arange(n_test) % 10).astype(np.uint8)
    write_idx(folder / FILES["train_images"], synthetic_images(train_labels, 0), compress)
    write_idx(folder / FILES["train_labels"], train_labels, compress)
    write_idx(folder / FILES["test_images"], synthetic_images(test_labels, 1), compress)
    write_idx(folder / FILES["test_labels"], test_labels, compress)
    return folder


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("fmnist"))


def tiny_raw(data_root: Path, **sections: dict) -> dict:
    """A raw spec for a fast CPU run on the synthetic data; sections override parts of it."""
    raw = {
        "experiment": "tiny",
        "data": {"root": str(data_root), "download": False, "val_size": 100},
        "model": {"num_blocks": 2, "filters": 8, "units1": 16, "units2": 16},
        "train": {"epochs": 1, "batch_size": 32, "lr": 3e-3, "device": "cpu", "scheduler": "none",
                  "eval_batch_size": 256},
        "mlflow": {"log_model": "none"},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(name, {}).update(values)
        else:
            raw[name] = values
    return raw
