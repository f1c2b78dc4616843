"""Stratified train/validation splits of a dataset's arrays, moved to the training device once.

Each trial's batches are sliced out of these on the device (see training.batches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fmnist_hpo.errors import DataError

if TYPE_CHECKING:
    import torch

    from fmnist_hpo.config.sections import DataConfig
    from fmnist_hpo.data.datasets import DatasetInfo
    from fmnist_hpo.data.loading import Dataset


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # (n, channels, size, size) uint8 on the training device
    labels: torch.Tensor  # (n,) int64 on the training device

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def first(self, n: int) -> Split:
        return Split(self.images[:n], self.labels[:n])


@dataclass(frozen=True)
class Splits:
    train: Split
    val: Split
    test: Split


def stratified_split(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices): val_size images drawn per class in proportion, seeded."""
    if not 0 < val_size < len(labels):
        raise DataError(f"data.val_size: {val_size} must be between 1 and {len(labels) - 1} for {len(labels)} training images")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quotas = np.floor(counts * val_size / len(labels)).astype(int)
    remainder = counts * val_size / len(labels) - quotas
    quotas[np.argsort(-remainder, kind="stable")[: val_size - quotas.sum()]] += 1
    val = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quotas, strict=True)]
    val_idx = np.sort(np.concatenate(val))
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx, assume_unique=True)
    return train_idx, val_idx


def balanced_subset(indices: np.ndarray, labels: np.ndarray, size: int) -> np.ndarray:
    """The first size indices (in file order) taking classes in turn, so every class is equally present."""
    if size >= len(indices):
        return indices
    by_class = [indices[labels[indices] == c] for c in np.unique(labels[indices])]
    per_class, extra = divmod(size, len(by_class))
    picked = [members[: per_class + (i < extra)] for i, members in enumerate(by_class)]
    return np.sort(np.concatenate(picked))


def split_indices(dataset: Dataset, val_size: int, split_seed: int,
                  train_subset: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices) into the training images, as every trial splits them."""
    train_idx, val_idx = stratified_split(dataset.train_labels, val_size, split_seed)
    if train_subset is not None:
        train_idx = balanced_subset(train_idx, dataset.train_labels, train_subset)
    return train_idx, val_idx


def make_splits(dataset: Dataset, cfg: DataConfig, device: torch.device) -> Splits:
    if cfg.dataset != dataset.info.name:
        raise DataError(f"data.dataset: {cfg.dataset} in a sweep of {dataset.info.name}: every trial of a sweep "
                        "trains on the one dataset its spec names")
    train_idx, val_idx = split_indices(dataset, cfg.val_size, cfg.split_seed, cfg.train_subset)
    return Splits(
        train=_to_split(dataset.train_images[train_idx], dataset.train_labels[train_idx], device),
        val=_to_split(dataset.train_images[val_idx], dataset.train_labels[val_idx], device),
        test=_to_split(dataset.test_images, dataset.test_labels, device),
    )


def _to_split(images: np.ndarray, labels: np.ndarray, device: torch.device) -> Split:
    import torch

    return Split(
        images=torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).to(device),
        labels=torch.from_numpy(np.ascontiguousarray(labels)).to(device),
    )


class SplitCache:
    """Splits on the device for one data config at a time, shared by every trial that uses it."""

    def __init__(self, dataset: Dataset, device: torch.device) -> None:
        self.dataset = dataset
        self.device = device
        self._key: tuple | None = None
        self._splits: Splits | None = None

    def get(self, cfg: DataConfig) -> Splits:
        key = (cfg.dataset, cfg.val_size, cfg.split_seed, cfg.train_subset)  # augmentation is per batch: not a split
        if self._splits is None or self._key != key:
            self._splits = None  # free the old tensors before making new ones
            self._splits = make_splits(self.dataset, cfg, self.device)
            self._key = key
        return self._splits


def noise_split(n: int, info: DatasetInfo, device: torch.device, generator: torch.Generator | None = None) -> Split:
    """n random images of info's shape with random labels: for timing and measuring steps, not for learning."""
    import torch

    shape = (n, info.channels, info.image_size, info.image_size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=generator)
    return Split(images, torch.randint(0, len(info.classes), (n,), device=device, generator=generator))
