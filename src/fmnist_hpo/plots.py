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
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from fmnist_hpo.analyze import finished, parameter_groups, searched_keys
from fmnist_hpo.records import LoggedTrial
from fmnist_hpo.tracking import RunReader


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def _save(fig: plt.Figure, path: Path) -> Path:
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


MAX_LEGEND_TRIALS = 10  # more trials than this are coloured along a colormap with a colorbar instead
KEPT_VAL_LABEL = "validation accuracy (kept epoch)"


def _trial_label(t: LoggedTrial) -> str:
    return f"trial {t.number}" + (f", repeat {t.repeat}" if t.repeat else "")


def _integer_ticks(axis: Any) -> None:
    axis.set_major_locator(MaxNLocator(integer=True))


def learning_curves(reader: RunReader, experiment: str, trials: list[LoggedTrial], folder: Path) -> Path:
    """Validation loss and accuracy per epoch, epochs numbered from 1 as the tables count them."""
    done = sorted(finished(trials), key=lambda t: (t.number, t.repeat))
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    by_colormap = len(done) > MAX_LEGEND_TRIALS
    colormap = plt.get_cmap("viridis")
    numbers = [t.number for t in done] or [0]
    scale = Normalize(vmin=min(numbers), vmax=max(max(numbers), min(numbers) + 1))
    for i, t in enumerate(done):
        color = colormap(scale(t.number)) if by_colormap else f"C{i % 10}"
        for ax, key in ((ax_loss, "val_loss"), (ax_acc, "val_accuracy")):
            points = reader.history(t.run_id, key)
            ax.plot([step + 1 for step, _ in points], [v for _, v in points], marker=".", linewidth=1,
                    color=color, label=_trial_label(t))
    ax_loss.set(title=f"{experiment}: validation loss", xlabel="epoch", ylabel="validation loss (cross-entropy)")
    ax_acc.set(title=f"{experiment}: validation accuracy", xlabel="epoch", ylabel="validation accuracy")
    for ax in (ax_loss, ax_acc):
        _integer_ticks(ax.xaxis)
    if by_colormap:
        fig.colorbar(ScalarMappable(norm=scale, cmap=colormap), ax=[ax_loss, ax_acc], label="trial")
    elif done:
        fig.legend(fontsize=7, loc="outside right center", handles=ax_acc.get_legend_handles_labels()[0])
    return _save(fig, folder / f"{_slug(experiment)}_learning_curves.png")


def parameters_vs_accuracy(experiment: str, trials: list[LoggedTrial], folder: Path) -> Path:
    done = finished(trials)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    points = ax.scatter([t.metrics["total_parameters"] for t in done], [t.metrics["test_accuracy"] for t in done],
                        c=[t.metrics.get("kept_val_accuracy", math.nan) for t in done], cmap="viridis",
                        edgecolors="black")
    fig.colorbar(points, ax=ax, label=KEPT_VAL_LABEL)
    ax.set_xscale("log")
    ax.set(title=f"{experiment}: model size vs test accuracy", xlabel="parameters (log scale)",
           ylabel="test accuracy")
    return _save(fig, folder / f"{_slug(experiment)}_parameters_vs_accuracy.png")


def optimisation_history(experiment: str, trials: list[LoggedTrial], folder: Path) -> Path:
    done = sorted(finished(trials), key=lambda t: t.number)
    xs = [t.number for t in done]
    ys = [t.metrics["kept_val_accuracy"] for t in done]
    best_so_far = [max(ys[: i + 1]) for i in range(len(ys))]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.scatter(xs, ys, color="tab:blue", label="trial")
    ax.step(xs, best_so_far, where="post", color="tab:red", label="best so far")
    ax.set(title=f"{experiment}: optimisation history", xlabel="trial", ylabel=KEPT_VAL_LABEL)
    _integer_ticks(ax.xaxis)
    ax.legend()
    return _save(fig, folder / f"{_slug(experiment)}_optimisation_history.png")


def accuracy_by_value(experiment: str, trials: list[LoggedTrial], key: str, folder: Path) -> Path:
    groups = parameter_groups(trials, key)
    labels = [label for label, _ in groups]
    fig, ax = plt.subplots(figsize=(max(5.5, 1.1 * len(groups) + 2.5), 4.4))
    data = [[t.metrics["kept_val_accuracy"] for t in members] for _, members in groups]
    ax.boxplot(data, showmeans=True, medianprops={"color": "tab:orange"},
               meanprops={"marker": "^", "markerfacecolor": "tab:green", "markeredgecolor": "tab:green"})
    long_labels = max((len(label) for label in labels), default=0) > 6
    ax.set_xticks(range(1, len(groups) + 1), labels, rotation=30 if long_labels else 0,
                  ha="right" if long_labels else "center")
    for i, values in enumerate(data, start=1):
        ax.scatter([i] * len(values), values, color="tab:blue", alpha=0.6, zorder=3, s=18)
    ax.legend(handles=[Line2D([], [], color="tab:orange", label="median"),
                       Line2D([], [], marker="^", linestyle="", color="tab:green", label="mean"),
                       Line2D([], [], marker="o", linestyle="", color="tab:blue", alpha=0.6, label="one run"),
                       Patch(facecolor="none", edgecolor="black", label="box: middle 50%; whiskers: to 1.5×IQR")],
              fontsize=7, loc="best")
    ax.set(title=f"{experiment}: validation accuracy by {key}", xlabel=key, ylabel=KEPT_VAL_LABEL)
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


def confusion_title(accuracy: float, experiment: str | None = None, trial: int | None = None,
                    fallback: str = "model") -> str:
    """'exp12, trial 7: test accuracy 91.23%'; fallback (a checkpoint's name) where the run is unknown."""
    who = f"{experiment}, trial {trial}" if experiment is not None and trial is not None else fallback
    return f"{who}: test accuracy {accuracy * 100:.2f}%"


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
    return _save(fig, path)
