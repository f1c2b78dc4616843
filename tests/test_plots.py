"""Plots a reader can read: integer epochs and trials, epochs counted from 1, colour always explained."""

from __future__ import annotations

from pathlib import Path

import pytest

from fmnist_hpo.analysis import plots
from fmnist_hpo.modelops import confusion
from fmnist_hpo.records import LoggedTrial

EPOCHS = 4


class FakeReader:
    """Metric histories with MLflow's 0-based steps."""

    def history(self, run_id: str, key: str) -> dict[int, float]:
        offset = int(run_id) * 0.001
        if key == "epoch_seconds":
            return dict.fromkeys(range(EPOCHS), 2.0)
        return {step: 0.8 + 0.01 * step + offset if key == "val_accuracy" else 1 / (step + 1) for step in range(EPOCHS)}


def trials(n: int) -> list[LoggedTrial]:
    return [LoggedTrial(str(i), "e", i, i, 0, "FINISHED", {"model.dropout_placement": ["early", "middle"][i % 2]},
                        {"test_accuracy": 0.9, "kept_val_accuracy": 0.8 + 0.001 * i, "total_parameters": 1000.0 * (i + 1)},
                        {}, {}) for i in range(n)]


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Every figure a plot function saves, by file name (still inspectable after it is closed)."""
    saved = {}
    real_save = plots._save

    def keep(fig, path: Path) -> Path:
        saved[path.name] = fig
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return saved


def integer_ticks(axis) -> bool:
    return all(float(tick).is_integer() for tick in axis.get_majorticklocs())


def colorbar_labels(fig) -> list[str]:
    return [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]


def test_learning_curves_count_epochs_from_one_with_a_legend(figures: dict, tmp_path: Path):
    plots.learning_curves(FakeReader(), "e", trials(3), tmp_path)
    fig = figures["e_learning_curves.png"]
    by_epoch, by_seconds = fig.axes[:2], fig.axes[2]
    for ax in by_epoch:
        assert integer_ticks(ax.xaxis)
        assert all(list(line.get_xdata()) == list(range(1, EPOCHS + 1)) for line in ax.get_lines())
    # the third panel: accuracy against the seconds spent (FakeReader: 2 s per epoch), with the targets
    first = next(line for line in by_seconds.get_lines() if len(line.get_xdata()) == EPOCHS)
    assert list(first.get_xdata()) == [2.0, 4.0, 6.0, 8.0]
    assert fig.get_supxlabel().startswith("3 finished, unpruned trials")
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["trial 0", "trial 1", "trial 2"]


def test_many_trials_get_a_colorbar_instead_of_a_legend(figures: dict, tmp_path: Path):
    plots.learning_curves(FakeReader(), "e", trials(plots.MAX_LEGEND_TRIALS + 2), tmp_path)
    fig = figures["e_learning_curves.png"]
    assert colorbar_labels(fig) == ["trial"] and not fig.legends


def test_colour_and_markers_are_explained(figures: dict, tmp_path: Path):
    plots.pareto_fronts("e", {"e": trials(4)}, tmp_path / "e_pareto.png")
    fig = figures["e_pareto.png"]
    assert fig.get_supxlabel() == plots.FRONT_RULE  # the figure names its selection rule
    assert "Pareto front" in [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    plots.optimisation_history("e", trials(4), tmp_path)
    assert integer_ticks(figures["e_optimisation_history.png"].axes[0].xaxis)
    plots.accuracy_by_value("e", trials(4), "model.dropout_placement", tmp_path)
    legend = figures["e_by_model.dropout_placement.png"].axes[0].get_legend()
    assert {"median", "mean", "one run"} <= {t.get_text() for t in legend.get_texts()}


def test_confusion_matrix_is_titled_by_trial_and_experiment():
    assert confusion.confusion_title(0.91234, "exp12", 7) == "exp12, trial 7: test accuracy 91.23%"
    assert confusion.confusion_title(0.5, fallback="best.pt") == "best.pt: test accuracy 50.00%"


def test_a_continuous_key_is_a_scatter_with_its_trend_on_a_log_axis(figures: dict, tmp_path: Path):
    runs = [LoggedTrial(str(i), "e", i, i, 0, "FINISHED", {"train.lr": 10 ** (-4 + i / 3)},
                        {"test_accuracy": 0.9, "kept_val_accuracy": 0.80 + 0.01 * i}, {}, {}) for i in range(7)]
    plots.accuracy_by_value("e", runs, "train.lr", tmp_path)
    ax = figures["e_by_train.lr.png"].axes[0]
    assert ax.get_xscale() == "log" and "(log scale)" in ax.get_xlabel()
    assert any(t.get_text().startswith("trend: rho +1.00") for t in ax.get_legend().get_texts())
