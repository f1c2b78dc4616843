"""The confusion matrix of a model on the test set, drawn as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only: no display is needed or wanted
import matplotlib.pyplot as plt

from fmnist_hpo.percent import percent


def confusion_title(accuracy: float, experiment: str | None = None, trial: int | None = None,
                    fallback: str = "model") -> str:
    """'exp12, trial 7: test accuracy 91.23%'; fallback (a checkpoint's name) where the run is unknown."""
    who = f"{experiment}, trial {trial}" if experiment is not None and trial is not None else fallback
    return f"{who}: test accuracy {percent(accuracy)}"


def confusion_matrix_png(confusion: Any, classes: tuple[str, ...], path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(8, 7))
    image = ax.imshow(confusion, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, label="test images")
    ax.set_xticks(range(len(classes)), classes, rotation=40, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(len(classes)), classes)
    threshold = confusion.max() / 2
    for (i, j), count in np.ndenumerate(confusion):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                color="white" if count > threshold else "black")
    ax.set(title=title, xlabel="predicted class", ylabel="true class")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
