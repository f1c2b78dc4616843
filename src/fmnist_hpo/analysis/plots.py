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
from matplotlib.ticker import EngFormatter, MaxNLocator, ScalarFormatter

from fmnist_hpo.analysis.analyze import (
    continuous_keys,
    finished,
    is_log_scaled,
    parameter_groups,
    search_metric,
    searched_keys,
    trend_of,
)
from fmnist_hpo.analysis.costs import ACROSS_EXPERIMENTS, FRONT_RULE, FRONTS, configurations, front
from fmnist_hpo.milestones import targets_in
from fmnist_hpo.records import LoggedTrial
from fmnist_hpo.tracking.reader import RunReader


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


def _caption(fig: plt.Figure, rule: str) -> None:
    """The figure's selection rule, under its axes: which runs it shows and how each was chosen."""
    fig.supxlabel(rule, fontsize=7, color="dimgray")


def _kept_rule(trials: list[LoggedTrial]) -> str:
    done = finished(trials)
    return (f"{len(done)} finished, unpruned trials; each at the epoch its validation "
            f"{search_metric(trials).removeprefix('val_')} kept")


def learning_curves(reader: RunReader, experiment: str, trials: list[LoggedTrial], folder: Path) -> Path:
    """Validation loss and accuracy per epoch (epochs numbered from 1, as the tables count them), and
    validation accuracy against the training seconds spent, with the time-to-accuracy targets."""
    done = sorted(finished(trials), key=lambda t: (t.number, t.repeat))
    fig, (ax_loss, ax_acc, ax_time) = plt.subplots(1, 3, figsize=(15, 4.4), layout="constrained")
    by_colormap = len(done) > MAX_LEGEND_TRIALS
    colormap = plt.get_cmap("viridis")
    numbers = [t.number for t in done] or [0]
    scale = Normalize(vmin=min(numbers), vmax=max(max(numbers), min(numbers) + 1))
    for i, t in enumerate(done):
        color = colormap(scale(t.number)) if by_colormap else f"C{i % 10}"
        accuracy = reader.history(t.run_id, "val_accuracy")
        for ax, points in ((ax_loss, reader.history(t.run_id, "val_loss")), (ax_acc, accuracy)):
            ax.plot([step + 1 for step in points], list(points.values()), marker=".", linewidth=1,
                    color=color, label=_trial_label(t))
        seconds = reader.history(t.run_id, "epoch_seconds")
        if seconds and all(step in seconds for step in accuracy):
            elapsed = np.cumsum([seconds[step] for step in accuracy])
            ax_time.plot(elapsed, list(accuracy.values()), marker=".", linewidth=1, color=color)
    for target in targets_in(t.metrics for t in done):
        ax_time.axhline(target, color="gray", linestyle=":", linewidth=0.8)
        ax_time.annotate(f"{target:.0%}" if round(target * 100) == target * 100 else f"{target:.1%}",
                         (1, target), xycoords=("axes fraction", "data"), fontsize=7, color="gray",
                         ha="right", va="bottom")
    ax_loss.set(title=f"{experiment}: validation loss", xlabel="epoch", ylabel="validation loss (cross-entropy)")
    ax_acc.set(title=f"{experiment}: validation accuracy", xlabel="epoch", ylabel="validation accuracy")
    ax_time.set(title=f"{experiment}: accuracy against time", xlabel="seconds of training and validation",
                ylabel="validation accuracy")
    for ax in (ax_loss, ax_acc):
        _integer_ticks(ax.xaxis)
    _caption(fig, f"{len(done)} finished, unpruned trials, every epoch; dotted: time-to-accuracy targets")
    if by_colormap:
        fig.colorbar(ScalarMappable(norm=scale, cmap=colormap), ax=[ax_loss, ax_acc, ax_time], label="trial")
    elif done:
        fig.legend(fontsize=7, loc="outside right center", handles=ax_acc.get_legend_handles_labels()[0])
    return _save(fig, folder / f"{_slug(experiment)}_learning_curves.png")


def pareto_fronts(title: str, trials_by_experiment: dict[str, list[LoggedTrial]], path: Path) -> Path:
    """Validation accuracy against parameters and against training seconds, a point per configuration,
    each front drawn as the staircase of configurations that nothing beats for less."""
    points = {name: configurations(name, trials) for name, trials in trials_by_experiment.items()}
    everything = [c for configs in points.values() for c in configs]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    several = len(points) > 1
    for ax, (name, cost) in zip(axes, FRONTS, strict=True):
        for i, (experiment, configs) in enumerate(points.items()):
            ax.scatter([cost(c) for c in configs], [c.val_accuracy for c in configs], s=28, alpha=0.7,
                       color=f"C{i % 10}" if several else "tab:blue", edgecolors="none",
                       label=experiment if several else "configuration")
        best = front(everything, cost)
        ax.step([cost(c) for c in best], [c.val_accuracy for c in best], where="post", color="tab:red",
                linewidth=1.2, label="Pareto front")
        ax.scatter([cost(c) for c in best], [c.val_accuracy for c in best], s=60, facecolors="none",
                   edgecolors="tab:red", linewidths=1.2)
        label = "parameters" if name == "parameters" else "seconds per trial (training and validation)"
        costs = [cost(c) for c in everything if math.isfinite(cost(c)) and cost(c) > 0]
        if costs and max(costs) >= 10 * min(costs):  # a log axis only where the costs span a decade or more
            ax.set_xscale("log")
            label += " (log scale)"
        ax.xaxis.set_major_formatter(EngFormatter(sep="") if name == "parameters" else ScalarFormatter())
        ax.set(title=f"{title}: validation accuracy vs {name}", xlabel=label, ylabel=KEPT_VAL_LABEL)
    axes[1].legend(fontsize=7, loc="lower right")
    _caption(fig, FRONT_RULE)
    return _save(fig, path)


def optimisation_history(experiment: str, trials: list[LoggedTrial], folder: Path) -> Path:
    done = sorted(finished(trials), key=lambda t: t.number)
    xs = [t.number for t in done]
    ys = [t.metrics["kept_val_accuracy"] for t in done]
    best_so_far = [max(ys[: i + 1]) for i in range(len(ys))]
    fig, ax = plt.subplots(figsize=(6, 4.4), layout="constrained")
    ax.scatter(xs, ys, color="tab:blue", label="trial")
    ax.step(xs, best_so_far, where="post", color="tab:red", label="best so far")
    ax.set(title=f"{experiment}: optimisation history", xlabel="trial", ylabel=KEPT_VAL_LABEL)
    _integer_ticks(ax.xaxis)
    ax.legend()
    _caption(fig, _kept_rule(trials) + ", in the order the search ran them")
    return _save(fig, folder / f"{_slug(experiment)}_optimisation_history.png")


def accuracy_by_value(experiment: str, trials: list[LoggedTrial], key: str, folder: Path) -> Path:
    """A scatter with its trend for a continuous key (log axis where its space is), boxes per value otherwise."""
    if key in continuous_keys(trials):
        return _accuracy_against_value(experiment, trials, key, folder)
    groups = parameter_groups(trials, key)
    labels = [label for label, _ in groups]
    fig, ax = plt.subplots(figsize=(max(5.5, 1.1 * len(groups) + 2.5), 4.6), layout="constrained")
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
    _caption(fig, _kept_rule(trials))
    return _save(fig, folder / f"{_slug(experiment)}_by_{_slug(key)}.png")


def _accuracy_against_value(experiment: str, trials: list[LoggedTrial], key: str, folder: Path) -> Path:
    done = [t for t in finished(trials) if key in t.values]
    log = is_log_scaled(trials, key)
    xs = np.asarray([float(t.values[key]) for t in done])
    ys = np.asarray([t.metrics["kept_val_accuracy"] for t in done])
    fig, ax = plt.subplots(figsize=(6.5, 4.6), layout="constrained")
    ax.scatter(xs, ys, color="tab:blue", alpha=0.7, s=22, label="one run")
    result = trend_of(trials, key)
    if math.isfinite(result.slope):
        line_x = np.geomspace(xs.min(), xs.max(), 50) if log else np.linspace(xs.min(), xs.max(), 50)
        line_y = result.intercept + result.slope * (np.log10(line_x) if log else line_x)
        ax.plot(line_x, line_y, color="tab:red", linewidth=1.2,
                label=f"trend: rho {result.rho:+.2f} (p={result.p_value:.2g}), R² {result.r_squared:.2f}")
    if log:
        ax.set_xscale("log")
    ax.set(title=f"{experiment}: validation accuracy against {key}", ylabel=KEPT_VAL_LABEL,
           xlabel=f"{key} (log scale)" if log else key)
    ax.legend(fontsize=7, loc="best")
    _caption(fig, _kept_rule(trials) + "; line: least squares" + (" on log10 of the value" if log else ""))
    return _save(fig, folder / f"{_slug(experiment)}_by_{_slug(key)}.png")


def write_plots(reader: RunReader, trials_by_experiment: dict[str, list[LoggedTrial]],
                folder: Path) -> dict[str, list[Path]]:
    """Every plot, by the experiment it shows (ACROSS_EXPERIMENTS for those of all of them)."""
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {}
    with_runs = {name: trials for name, trials in trials_by_experiment.items() if finished(trials)}
    for experiment, trials in with_runs.items():
        written[experiment] = [
            learning_curves(reader, experiment, trials, folder),
            pareto_fronts(experiment, {experiment: trials}, folder / f"{_slug(experiment)}_pareto.png"),
            optimisation_history(experiment, trials, folder),
            *(accuracy_by_value(experiment, trials, key, folder) for key in searched_keys(trials)),
        ]
    if len(with_runs) > 1:
        written[ACROSS_EXPERIMENTS] = [pareto_fronts("all experiments", with_runs, folder / "all_experiments_pareto.png")]
    return written


