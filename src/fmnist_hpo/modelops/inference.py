"""Using a trained model: scoring the test set (per-class numbers, confusion matrix) and ranking the classes of images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fmnist_hpo.data.datasets import DatasetInfo
from fmnist_hpo.training.batches import normalize


@dataclass
class Evaluation:
    classes: tuple[str, ...]
    accuracy: float
    loss: float
    confusion: np.ndarray  # [true class, predicted class] counts
    precision: np.ndarray  # per class; nan where the class was never predicted
    recall: np.ndarray

    def as_metrics(self) -> dict[str, float]:
        metrics = {"eval_test_accuracy": self.accuracy, "eval_test_loss": self.loss}
        for i, name in enumerate(self.classes):
            slug = name.lower().replace("/", "_").replace(" ", "_").replace("-", "_")
            metrics[f"eval_precision_{slug}"] = float(self.precision[i])
            metrics[f"eval_recall_{slug}"] = float(self.recall[i])
        return metrics


@torch.inference_mode()
def predict_logits(model: nn.Module, images: np.ndarray, info: DatasetInfo, batch_size: int = 512) -> torch.Tensor:
    """Logits for uint8 images of shape (N, 28, 28) from info, computed on the CPU in eval mode."""
    model.eval()
    x = torch.from_numpy(np.require(images, requirements=["C", "W"])).unsqueeze(1)  # a read-only file buffer is copied
    return torch.cat([model(normalize(x[i:i + batch_size], info)) for i in range(0, len(x), batch_size)])


def evaluate_model(model: nn.Module, images: np.ndarray, labels: np.ndarray, info: DatasetInfo) -> Evaluation:
    logits = predict_logits(model, images, info)
    y = torch.from_numpy(labels.astype(np.int64))
    predicted = logits.argmax(1).numpy()
    confusion = np.zeros((len(info.classes), len(info.classes)), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.diag(confusion) / confusion.sum(axis=0)
        recall = np.diag(confusion) / confusion.sum(axis=1)
    return Evaluation(
        classes=info.classes,
        accuracy=float((predicted == labels).mean()),
        loss=float(torch.nn.functional.cross_entropy(logits, y)),
        confusion=confusion, precision=precision, recall=recall,
    )


def top_k(model: nn.Module, images: np.ndarray, info: DatasetInfo, k: int = 3) -> list[list[tuple[str, float]]]:
    """For each image, its k likeliest classes of info, with their probabilities."""
    probabilities = predict_logits(model, images, info).softmax(1)
    values, indices = probabilities.topk(k, dim=1)
    return [[(info.classes[i], float(p)) for p, i in zip(row_p.tolist(), row_i.tolist(), strict=True)]
            for row_p, row_i in zip(values, indices, strict=True)]


def accuracy_line(ranked: list[list[tuple[str, float]]], labels: np.ndarray, source: Path,
                  info: DatasetInfo) -> str:
    correct = sum(row[0][0] == info.classes[label] for row, label in zip(ranked, labels.tolist(), strict=True))
    return f"accuracy {correct / len(labels):.4f} ({correct} of {len(labels)} images right; labels: {source})"


def column_label(name: str) -> str:
    """A class name as one word for a column head: 'T-shirt/top' -> 'T-shirt', 'Ankle boot' -> 'Ankle'."""
    return name.split("/")[0].split()[0]


def confusion_lines(confusion: np.ndarray, classes: tuple[str, ...]) -> list[str]:
    """The confusion matrix as text, each row named by its class and each column by its class's first word."""
    row_width = max(len(name) for name in classes) + 1
    cell = max(len(column_label(name)) for name in classes) + 1
    lines = [" " * row_width + "".join(f"{column_label(name):>{cell}}" for name in classes)]
    for name, row in zip(classes, confusion, strict=True):
        lines.append(f"{name:<{row_width}}" + "".join(f"{int(count):>{cell}d}" for count in row))
    return lines
