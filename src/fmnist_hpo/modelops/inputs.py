"""What `fmnist predict` classifies: picture files, or an IDX image file with its labels, as the dataset's images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fmnist_hpo.data.idx import check_images, check_labels, read_idx
from fmnist_hpo.errors import FmnistError

if TYPE_CHECKING:
    from fmnist_hpo.data.datasets import DatasetInfo

MAX_IMAGE_PIXELS = 50_000_000  # a 50-megapixel photo; anything larger is refused before it is decoded


class ImageError(FmnistError):
    """An image file cannot be read as a picture."""


@dataclass(frozen=True)
class PredictInputs:
    images: np.ndarray  # (n, size, size) uint8, as the dataset's images are
    names: list[str]  # one per image, to print beside its prediction
    total: int  # images in the input; more than len(images) where only the printed ones are predicted
    truth: np.ndarray | None = None  # the labels, where there are some to score against
    labels: Path | None = None  # the file they came from


def check_input_files(paths: list[Path]) -> None:
    for path in paths:
        if not path.is_file():
            raise FmnistError(f"{path}: {'is a directory, not an image file' if path.is_dir() else 'no such file'}")


def picture_inputs(paths: list[Path], info: DatasetInfo) -> PredictInputs:
    return PredictInputs(np.stack([load_image(path, info) for path in paths]), [str(path) for path in paths],
                         len(paths))


def idx_inputs(idx: Path, labels: Path | None, limit: int, info: DatasetInfo) -> PredictInputs:
    """The images of idx, with labels (else the label file beside it, if any) to score them against; with
    nothing to score, only the first limit (0: all) are kept."""
    images = read_idx(idx, item_shape=info.image_shape)  # the header is checked before the data is inflated
    check_images(images, idx, info)
    labels = labels or labels_beside(idx)
    truth = None
    if labels is not None:
        truth = read_idx(labels)
        check_labels(truth, labels, images, idx, info)
    total = len(images)
    if truth is None and limit:
        images = images[:limit]  # nothing to score: predict only what is printed
    return PredictInputs(images, [f"{idx.name}[{i}]" for i in range(len(images))], total, truth, labels)


def labels_beside(images: Path) -> Path | None:
    """The label file that goes with an IDX image file: t10k-images-idx3-ubyte.gz -> t10k-labels-idx1-ubyte(.gz)."""
    name = images.name.replace("images-idx3", "labels-idx1")
    if name == images.name:
        return None
    stem = name.removesuffix(".gz")
    return next((images.with_name(n) for n in (name, stem, f"{stem}.gz") if images.with_name(n).is_file()), None)


def load_image(path: Path, info: DatasetInfo) -> np.ndarray:
    """A PNG/JPEG of any size or colour -> uint8 at info's image size, light on a dark ground like the data."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as opened:  # reads the header only: the pixels are decoded by convert
            if opened.width * opened.height > MAX_IMAGE_PIXELS:
                raise ImageError(f"{path}: {opened.width}x{opened.height} pixels, more than an image to classify "
                                 f"may have ({MAX_IMAGE_PIXELS}); shrink it first")
            image = ImageOps.exif_transpose(opened).convert("L")
    except Image.DecompressionBombError:
        raise ImageError(f"{path}: declares more pixels than an image to classify may have; shrink it first") from None
    except (OSError, UnidentifiedImageError) as exc:
        raise ImageError(f"{path}: not a readable image ({exc.__class__.__name__})") from None
    pixels = np.asarray(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if border.mean() > 127:  # a photo on a light background: the datasets are light on black
        image = ImageOps.invert(image)
    size = info.image_size
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    canvas = Image.new("L", (size, size), 0)
    canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return np.asarray(canvas, dtype=np.uint8)
