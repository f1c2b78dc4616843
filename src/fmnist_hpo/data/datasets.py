"""Fashion-MNIST: IDX files -> uint8 arrays -> stratified splits -> batches on the device.

The whole dataset is 55 MB as uint8, so it is read once, moved to the training device once and
batched there by slicing; each batch is normalised and augmented on the device.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from fmnist_hpo.errors import DataError

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch

    from fmnist_hpo.config.sections import DataConfig

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530
IMAGE_SIZE = 28
_IDX_UBYTE = 0x08


@dataclass(frozen=True)
class Dataset:
    train_images: np.ndarray  # (60000, 28, 28) uint8
    train_labels: np.ndarray  # (60000,) int64
    test_images: np.ndarray
    test_labels: np.ndarray


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # (n, 1, 28, 28) uint8 on the training device
    labels: torch.Tensor  # (n,) int64 on the training device

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class Splits:
    train: Split
    val: Split
    test: Split


MAX_IDX_BYTES = 256 * 2**20  # the training images are 47 MB; predict reads at most this much too


def read_idx(path: Path, item_shape: tuple[int, ...] | None = None, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """One IDX file (gzipped or not) as a uint8 array, checked against its own header.

    The header is read first, streaming through gzip: a file declaring more than max_bytes of data, or
    items not of item_shape, is refused before anything more is read or inflated.
    """
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            shape = _idx_shape(path, handle)
            if item_shape is not None and shape[1:] != item_shape:
                raise DataError(f"{path}: expected {'x'.join(map(str, item_shape))} images, its header declares shape "
                                f"{shape}")
            expected = math.prod(shape)
            if expected > max_bytes:
                raise DataError(f"{path}: its header declares {expected} bytes of data, more than the {max_bytes} "
                                "an IDX file may hold here")
            blob = handle.read(expected)
            if len(blob) < expected:
                raise DataError(f"{path}: truncated: header promises {expected} bytes of data, file has {len(blob)}")
            extra = len(handle.read(2**20))
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot be read ({exc})") from None
    if extra:
        raise DataError(f"{path}: {extra}{'+' if extra == 2**20 else ''} unexpected bytes after the data")
    return np.frombuffer(blob, dtype=np.uint8).reshape(shape).copy()


def _idx_shape(path: Path, handle: BinaryIO) -> tuple[int, ...]:
    magic = handle.read(4)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] != _IDX_UBYTE:
        raise DataError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = magic[3]
    dims = handle.read(4 * ndim)
    if ndim == 0 or len(dims) < 4 * ndim:
        raise DataError(f"{path}: header is truncated")
    return tuple(int(d) for d in np.frombuffer(dims, dtype=">u4"))


def data_root(cfg: DataConfig) -> Path:
    return Path(cfg.root or os.environ.get("FMNIST_DATA_DIR") or "data").expanduser()


def find_files(root: Path) -> dict[str, Path] | None:
    """The four files under root (plain or .gz, or where torchvision puts them); None if any is missing."""
    found = {}
    for key, name in FILES.items():
        candidates = [root / name, root / f"{name}.gz", root / "FashionMNIST" / "raw" / name,
                      root / "FashionMNIST" / "raw" / f"{name}.gz"]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            return None
        found[key] = path
    return found


def download(root: Path) -> None:
    """Fetch the dataset with torchvision into root/FashionMNIST/raw; on failure, say why and remove the
    folders this call created (left empty: torchvision opens a file only once a download has started)."""
    created = [folder for folder in (root / "FashionMNIST" / "raw", root / "FashionMNIST", root, *root.parents)
               if not folder.exists()]
    printed = io.StringIO()
    try:
        from torchvision.datasets import FashionMNIST

        root.mkdir(parents=True, exist_ok=True)
        with contextlib.redirect_stdout(printed):
            for train in (True, False):
                FashionMNIST(str(root), train=train, download=True)
    except Exception as exc:  # torchvision raises URLError, RuntimeError, OSError...
        _remove_empty(created)
        raise DataError(
            f"Fashion-MNIST is not in {root} and could not be downloaded ({_failure_reason(exc, printed.getvalue())}); "
            f"put {', '.join(f + '.gz' for f in FILES.values())} there "
            "or point FMNIST_DATA_DIR / data.root at them"
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


def missing_data(root: Path) -> DataError:
    return DataError(
        f"Fashion-MNIST is not in {root}; put {', '.join(FILES.values())} (gzipped or not) there, "
        "or point FMNIST_DATA_DIR / data.root at them (or set data.download: true)"
    )


def load_dataset(cfg: DataConfig) -> Dataset:
    root = data_root(cfg)
    paths = find_files(root)
    if paths is None:
        if not cfg.download:
            raise missing_data(root)
        download(root)
        paths = find_files(root)
        if paths is None:
            raise DataError(f"download finished but the files are still missing from {root}")
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for part in ("train", "test"):
        _check_pair(arrays[f"{part}_images"], arrays[f"{part}_labels"],
                    paths[f"{part}_images"], paths[f"{part}_labels"])
    return Dataset(
        train_images=arrays["train_images"],
        train_labels=arrays["train_labels"].astype(np.int64),
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"].astype(np.int64),
    )


def _check_pair(images: np.ndarray, labels: np.ndarray, image_path: Path, label_path: Path) -> None:
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{image_path}: expected images of 28x28, got shape {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{label_path}: expected a 1-D label file, got shape {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{label_path}: {len(labels)} labels for {len(images)} images in {image_path.name}")
    if labels.size and labels.max() >= len(CLASSES):
        raise DataError(f"{label_path}: label {int(labels.max())} is not a class (0-9)")


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
        key = (cfg.val_size, cfg.split_seed, cfg.train_subset)  # augmentation happens per batch: not a new split
        if self._splits is None or self._key != key:
            self._splits = None  # free the old tensors before making new ones
            self._splits = make_splits(self.dataset, cfg, self.device)
            self._key = key
        return self._splits


# --- batches on the device -----------------------------------------------------------------------

BLACK = -FMNIST_MEAN / FMNIST_STD  # a pixel of 0 after normalisation: Fashion-MNIST's background


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> standardised float32, on whatever device the batch is."""
    return images.float().mul_(1.0 / (255.0 * FMNIST_STD)).sub_(FMNIST_MEAN / FMNIST_STD)


def augment(x: torch.Tensor, cfg: DataConfig, generator: torch.Generator) -> torch.Tensor:
    """Flip, translate and erase a normalised batch, each image independently, on its device.

    Translation brings in black background; erased patches take the mean pixel (0 once normalised),
    as torchvision's RandomErasing does.
    """
    import torch
    import torch.nn.functional as F

    n, _, h, w = x.shape
    dev = x.device
    if cfg.augment_flip:
        flip = torch.rand(n, device=dev, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if cfg.augment_translate:
        t = cfg.augment_translate
        padded = F.pad(x, (t, t, t, t), value=BLACK)
        dy, dx = (torch.randint(0, 2 * t + 1, (2, n), device=dev, generator=generator))
        rows = (torch.arange(h, device=dev)[None, :] + dy[:, None])[:, None, :, None].expand(n, 1, h, w + 2 * t)
        cols = (torch.arange(w, device=dev)[None, :] + dx[:, None])[:, None, None, :].expand(n, 1, h, w)
        x = padded.gather(2, rows).gather(3, cols)
    if cfg.augment_erase:
        erase = torch.rand(n, device=dev, generator=generator) < cfg.augment_erase
        size = torch.randint(4, h // 2 + 1, (2, n), device=dev, generator=generator)
        top = (torch.rand(n, device=dev, generator=generator) * (h - size[0])).long()
        left = (torch.rand(n, device=dev, generator=generator) * (w - size[1])).long()
        r = torch.arange(h, device=dev)[None, :]
        c = torch.arange(w, device=dev)[None, :]
        in_rows = (r >= top[:, None]) & (r < (top + size[0])[:, None])
        in_cols = (c >= left[:, None]) & (c < (left + size[1])[:, None])
        mask = (in_rows[:, :, None] & in_cols[:, None, :] & erase[:, None, None])[:, None]
        x = x.masked_fill(mask, 0.0)
    return x


def steps_per_epoch(n: int, batch_size: int) -> int:
    """How many batches `batches` yields for n images: a last batch of one image is dropped."""
    full, rest = divmod(n, batch_size)
    return max(1, full + (rest > 1))


def batches(n: int, batch_size: int, generator: torch.Generator, device: torch.device) -> Iterator[torch.Tensor]:
    """Index tensors of a shuffled epoch; a last batch of one image is dropped (BatchNorm needs two)."""
    import torch

    order = torch.randperm(n, device=device, generator=generator)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if idx.numel() > 1:
            yield idx
