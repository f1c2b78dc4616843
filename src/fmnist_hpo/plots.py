"""PNG plots of a sweep: learning curves, size vs accuracy, optimisation history, accuracy by value."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only: no display is needed or wanted
import matplotlib.pyplot as plt

from fmnist_hpo.analyze import finished, parameter_groups, searched_keys
from fmnist_hpo.records import LoggedTrial
from fmnist_hpo.tracking import RunReader


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def learning_curves(reader: RunReader, experiment: str, trials: list[LoggedTrial], folder: Path) -> Path:
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for t in finished(trials):
        label = f"trial {t.number}" + (f".{t.repeat}" if t.repeat else "")
        for ax, key in ((ax_loss, "val_loss"), (ax_acc, "val_accuracy")):
            points = reader.history(t.run_id, key)
            ax.plot([s for s, _ in points], [v for _, v in points], marker=".", linewidth=1, label=label)
    ax_loss.set(title=f"{experiment}: validation loss", xlabel="epoch", ylabel="val_loss")
    ax_acc.set(title=f"{experiment}: validation accuracy", xlabel="epoch", ylabel="val_accuracy")
    if len(finished(trials)) <= 12:
        ax_acc.legend(fontsize=7)
    return _save(fig, folder / f"{_slug(experiment)}_learning_curves.png")


def parameters_vs_accuracy(experiment: str, trials: list[LoggedTrial], folder: Path) -> Path:
    done = finished(trials)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.scatter([t.metrics["total_parameters"] for t in done], [t.metrics["test_accuracy"] for t in done],
               c=[t.metrics.get("kept_val_accuracy", math.nan) for t in done], cmap="viridis", edgecolors="black")
    ax.set_xscale("log")
    ax.set(title=f"{experiment}: model size vs test accuracy", xlabel="parameters", ylabel="test accuracy")
    return _save(fig, folder / f"{_slug(experiment)}_parameters_vs_accuracy.png")


def optimisation_history(experiment: str, trials: list[LoggedTrial], folder: Path) -> Path:
    done = sorted(finished(trials), key=lambda t: t.number)
    xs = [t.number for t in done]
    ys = [t.metrics["kept_val_accuracy"] for t in done]
    best_so_far = [max(ys[: i + 1]) for i in range(len(ys))]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.scatter(xs, ys, color="tab:blue", label="trial")
    ax.step(xs, best_so_far, where="post", color="tab:red", label="best so far")
    ax.set(title=f"{experiment}: optimisation history", xlabel="trial", ylabel="best validation accuracy")
    ax.legend()
    return _save(fig, folder / f"{_slug(experiment)}_optimisation_history.png")


def accuracy_by_value(experiment: str, trials: list[LoggedTrial], key: str, folder: Path) -> Path:
    groups = parameter_groups(trials, key)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(groups) + 2), 4.2))
    data = [[t.metrics["kept_val_accuracy"] for t in members] for _, members in groups]
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(groups) + 1), [label for label, _ in groups], rotation=20)
    for i, values in enumerate(data, start=1):
        ax.scatter([i] * len(values), values, color="tab:orange", alpha=0.7, zorder=3)
    ax.set(title=f"{experiment}: validation accuracy by {key}", xlabel=key, ylabel="best validation accuracy")
    return _save(fig, folder / f"{_slug(experiment)}_by_{_slug(key)}.png")


def write_plots(reader: RunReader, trials_by_experiment: dict[str, list[LoggedTrial]], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for experiment, trials in trials_by_experiment.items():
        if not finished(trials):
            continue
        written.append(learning_curves(reader, experiment, trials, folder))
        written.append(parameters_vs_accuracy(experiment, trials, folder))
        written.append(optimisation_history(experiment, trials, folder))
        written += [accuracy_by_value(experiment, trials, key, folder) for key in searched_keys(trials)]
    return written


def confusion_matrix_png(confusion: Any, classes: tuple[str, ...], path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    image = ax.imshow(confusion, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    threshold = confusion.max() / 2
    for (i, j), count in np.ndenumerate(confusion):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                color="white" if count > threshold else "black")
    ax.set(title=title, xlabel="predicted", ylabel="true")
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, path)
