"""Using a trained model: scoring the test set (per-class numbers, confusion matrix) and predicting images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fmnist_hpo.data.datasets import CLASSES, IMAGE_SIZE, normalize
from fmnist_hpo.errors import FmnistError

MAX_IMAGE_PIXELS = 50_000_000  # a 50-megapixel photo; anything larger is refused before it is decoded


class ImageError(FmnistError):
    """An image file cannot be read as a picture."""


@dataclass
class Evaluation:
    accuracy: float
    loss: float
    confusion: np.ndarray  # [true class, predicted class] counts
    precision: np.ndarray  # per class; nan where the class was never predicted
    recall: np.ndarray

    def as_metrics(self) -> dict[str, float]:
        metrics = {"eval_test_accuracy": self.accuracy, "eval_test_loss": self.loss}
        for i, name in enumerate(CLASSES):
            slug = name.lower().replace("/", "_").replace(" ", "_").replace("-", "_")
            metrics[f"eval_precision_{slug}"] = float(self.precision[i])
            metrics[f"eval_recall_{slug}"] = float(self.recall[i])
        return metrics


@torch.inference_mode()
def predict_logits(model: nn.Module, images: np.ndarray, batch_size: int = 512) -> torch.Tensor:
    """Logits for uint8 images of shape (N, 28, 28), computed on the CPU in eval mode."""
    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)
    return torch.cat([model(normalize(x[i:i + batch_size])) for i in range(0, len(x), batch_size)])


def evaluate_model(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> Evaluation:
    logits = predict_logits(model, images)
    y = torch.from_numpy(labels.astype(np.int64))
    predicted = logits.argmax(1).numpy()
    confusion = np.zeros((len(CLASSES), len(CLASSES)), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.diag(confusion) / confusion.sum(axis=0)
        recall = np.diag(confusion) / confusion.sum(axis=1)
    return Evaluation(
        accuracy=float((predicted == labels).mean()),
        loss=float(torch.nn.functional.cross_entropy(logits, y)),
        confusion=confusion, precision=precision, recall=recall,
    )


def load_image(path: Path) -> np.ndarray:
    """A PNG/JPEG of any size or colour -> 28x28 uint8, light garment on a dark ground like the data."""
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
    if border.mean() > 127:  # a photo on a light background: Fashion-MNIST is light on black
        image = ImageOps.invert(image)
    image.thumbnail((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    canvas.paste(image, ((IMAGE_SIZE - image.width) // 2, (IMAGE_SIZE - image.height) // 2))
    return np.asarray(canvas, dtype=np.uint8)


def top_k(model: nn.Module, images: np.ndarray, k: int = 3) -> list[list[tuple[str, float]]]:
    probabilities = predict_logits(model, images).softmax(1)
    values, indices = probabilities.topk(k, dim=1)
    return [[(CLASSES[i], float(p)) for p, i in zip(row_p.tolist(), row_i.tolist(), strict=True)]
            for row_p, row_i in zip(values, indices, strict=True)]


def labels_beside(images: Path) -> Path | None:
    """The label file that goes with an IDX image file: t10k-images-idx3-ubyte.gz -> t10k-labels-idx1-ubyte(.gz)."""
    name = images.name.replace("images-idx3", "labels-idx1")
    if name == images.name:
        return None
    stem = name.removesuffix(".gz")
    return next((images.with_name(n) for n in (name, stem, f"{stem}.gz") if images.with_name(n).is_file()), None)


def read_labels(path: Path, count: int) -> np.ndarray:
    """An IDX label file for count images: one class index per image, each a known class."""
    from fmnist_hpo.data.datasets import read_idx

    labels = read_idx(path)
    if labels.ndim != 1 or len(labels) != count:
        raise FmnistError(f"{path}: expected {count} labels (one per image), got shape {labels.shape}")
    if labels.size and int(labels.max()) >= len(CLASSES):
        raise FmnistError(f"{path}: label {int(labels.max())} is not a class (0-{len(CLASSES) - 1})")
    return labels


def accuracy_line(ranked: list[list[tuple[str, float]]], labels: np.ndarray, source: Path) -> str:
    correct = sum(row[0][0] == CLASSES[label] for row, label in zip(ranked, labels.tolist(), strict=True))
    return f"accuracy {correct / len(labels):.4f} ({correct} of {len(labels)} images right; labels: {source})"


def column_label(name: str) -> str:
    """A class name as one word for a column head: 'T-shirt/top' -> 'T-shirt', 'Ankle boot' -> 'Ankle'."""
    return name.split("/")[0].split()[0]


def confusion_lines(confusion: np.ndarray) -> list[str]:
    """The confusion matrix as text, each row named by its class and each column by its class's first word."""
    row_width = max(len(name) for name in CLASSES) + 1
    cell = max(len(column_label(name)) for name in CLASSES) + 1
    lines = [" " * row_width + "".join(f"{column_label(name):>{cell}}" for name in CLASSES)]
    for name, row in zip(CLASSES, confusion, strict=True):
        lines.append(f"{name:<{row_width}}" + "".join(f"{int(count):>{cell}d}" for count in row))
    return lines
