"""IDX files (gzipped or not) read into uint8 arrays, checked against their own headers and the dataset."""

from __future__ import annotations

import gzip
import math
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from fmnist_hpo.errors import DataError

if TYPE_CHECKING:
    from fmnist_hpo.data.datasets import DatasetInfo

_IDX_UBYTE = 0x08
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


def check_images(images: np.ndarray, path: Path, info: DatasetInfo) -> None:
    if images.ndim != 3 or images.shape[1:] != info.image_shape:
        size = "x".join(map(str, info.image_shape))
        raise DataError(f"{path}: expected {info.title} images of {size}, got shape {images.shape}")


def check_labels(labels: np.ndarray, path: Path, images: np.ndarray, images_path: Path, info: DatasetInfo) -> None:
    """labels (read from path): one per image of images, each one of info's classes."""
    if labels.ndim != 1:
        raise DataError(f"{path}: expected a 1-D label file, got shape {labels.shape}")
    if len(labels) != len(images):
        raise DataError(f"{path}: {len(labels)} labels for {len(images)} images in {images_path.name}")
    if labels.size and int(labels.max()) >= len(info.classes):
        raise DataError(f"{path}: label {int(labels.max())} is not a class of {info.title} "
                        f"(0-{len(info.classes) - 1})")
