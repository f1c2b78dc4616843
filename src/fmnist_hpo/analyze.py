"""Logged trials -> sections of numbers (summary, top trials, per-parameter, comparisons) and a report.

Every section is plain data (`Section`: a title, column names and rows of raw values); render.py
turns the same sections into a table, markdown, CSV or JSON, so every format shows the same numbers.
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmnist_hpo.errors import FmnistError
from fmnist_hpo.stats import compare, summarize
from fmnist_hpo.tracking import LoggedTrial, best_of

ACCURACY_METRICS = ("best_val_accuracy", "test_accuracy")
MAX_GROUPS = 8  # more distinct values (more than 4 for a continuous one) are grouped into quartile ranges


class AnalysisError(FmnistError):
    """An analysis request that the logged runs cannot answer."""


@dataclass
class Section:
    title: str
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)


def finished(trials: list[LoggedTrial]) -> list[LoggedTrial]:
    return [t for t in trials if t.status == "FINISHED" and "test_accuracy" in t.metrics]


def metric_values(trials: list[LoggedTrial], key: str) -> list[float]:
    return [t.metrics[key] for t in trials if key in t.metrics]


def selected_trial(trials: list[LoggedTrial]) -> LoggedTrial | None:
    """The trial the validation split picks, by the sweep's own search metric (never the test set)."""
    return best_of(trials)


def summary_row(experiment: str, trials: list[LoggedTrial]) -> dict[str, Any]:
    done = finished(trials)
    best = selected_trial(trials)
    val, test = summarize(metric_values(done, "best_val_accuracy")), summarize(metric_values(done, "test_accuracy"))
    gaps = [t.metrics["best_train_accuracy"] - t.metrics["test_accuracy"] for t in done if "best_train_accuracy" in t.metrics]
    return {
        "experiment": experiment,
        "finished": len(done),
        "failed": sum(t.status == "FAILED" for t in trials),
        "best_val_accuracy": best.metrics["best_val_accuracy"] if best else math.nan,
        "selected_test_accuracy": best.metrics["test_accuracy"] if best else math.nan,
        "val_mean": val.mean, "val_std": val.std, "val_ci95": [val.ci_low, val.ci_high],
        "test_mean": test.mean, "test_std": test.std, "test_ci95": [test.ci_low, test.ci_high],
        "median_parameters": _median(metric_values(done, "total_parameters")),
        "median_train_seconds": _median(metric_values(done, "train_seconds")),
        "median_epochs": _median(metric_values(done, "epochs_run")),
        "mean_gap": statistics.fmean(gaps) if gaps else math.nan,
    }


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


SUMMARY_COLUMNS = list(summary_row("", []).keys())


def top_trials(experiment: str, trials: list[LoggedTrial], limit: int = 5) -> Section:
    keys = searched_keys(trials)
    ranked = sorted(finished(trials), key=lambda t: -t.metrics.get("best_val_accuracy", -math.inf))[:limit]
    section = Section(f"{experiment}: top trials by validation accuracy",
                      ["trial", "repeat", *keys, "best_val_accuracy", "test_accuracy", "epochs_run", "total_parameters"])
    for t in ranked:
        section.rows.append({"trial": t.number, "repeat": t.repeat, **{k: t.values.get(k) for k in keys},
                             "best_val_accuracy": t.metrics.get("best_val_accuracy"),
                             "test_accuracy": t.metrics.get("test_accuracy"),
                             "epochs_run": t.metrics.get("epochs_run"), "total_parameters": t.metrics.get("total_parameters")})
    return section


def searched_keys(trials: list[LoggedTrial]) -> list[str]:
    return list(dict.fromkeys(k for t in trials for k in t.values))


def parameter_groups(trials: list[LoggedTrial], key: str) -> list[tuple[str, list[LoggedTrial]]]:
    """(label, trials) per value of key; many distinct numbers are binned into quartile ranges."""
    with_key = [t for t in finished(trials) if key in t.values]
    distinct = sorted({_hashable(t.values[key]) for t in with_key}, key=_sort_key)
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in distinct)
    continuous = numeric and any(isinstance(v, float) and not v.is_integer() for v in distinct)
    if not numeric or len(distinct) <= (4 if continuous else MAX_GROUPS):
        return [(_label(v), [t for t in with_key if _hashable(t.values[key]) == v]) for v in distinct]
    edges = [float(x) for x in _quantiles([float(v) for v in distinct])]
    groups = []
    for low, high in itertools.pairwise(edges):
        last = high == edges[-1]
        members = [t for t in with_key if low <= t.values[key] < high or (last and t.values[key] == high)]
        groups.append((f"[{low:.4g}, {high:.4g}{']' if last else ')'}", members))
    return groups


def _quantiles(values: list[float]) -> list[float]:
    import numpy as np

    return list(np.quantile(values, [0, 0.25, 0.5, 0.75, 1.0]))


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _sort_key(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, int | float) and not isinstance(value, bool) else (1, str(value))


def _label(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(list(value) if isinstance(value, tuple) else value)


def by_parameter(experiment: str, trials: list[LoggedTrial]) -> Section:
    section = Section(f"{experiment}: accuracy by value of each searched parameter",
                      ["parameter", "value", "n", "val_mean", "val_std", "test_mean", "test_std"])
    for key in searched_keys(trials):
        for label, members in parameter_groups(trials, key):
            val = summarize(metric_values(members, "best_val_accuracy"))
            test = summarize(metric_values(members, "test_accuracy"))
            section.rows.append({"parameter": key, "value": label, "n": val.n, "val_mean": val.mean,
                                 "val_std": val.std, "test_mean": test.mean, "test_std": test.std})
    return section


def parse_group(spec: str) -> tuple[str, str | None, str | None]:
    """'exp13' -> ('exp13', None, None); 'exp13:model.dropout_placement=late' -> (exp13, key, value)."""
    experiment, _, condition = spec.partition(":")
    if not condition:
        return experiment, None, None
    key, sep, value = condition.partition("=")
    if not sep:
        raise AnalysisError(f"--compare {spec!r}: a group is EXPERIMENT or EXPERIMENT:KEY=VALUE")
    return experiment, key, value


def select_group(trials: list[LoggedTrial], key: str | None, value: str | None) -> list[LoggedTrial]:
    if key is None:
        return finished(trials)
    return [t for t in finished(trials) if key in t.values and _label(_hashable(t.values[key])) == value]


def comparison_section(a_spec: str, a_trials: list[LoggedTrial], b_spec: str, b_trials: list[LoggedTrial],
                       metric: str = "test_accuracy") -> Section:
    result = compare(metric_values(a_trials, metric), metric_values(b_trials, metric), a_spec, b_spec)
    section = Section(f"{a_spec} vs {b_spec} ({metric})",
                      ["a", "b", "n_a", "n_b", "mean_a", "mean_b", "difference", "difference_ci95", "p_value", "verdict"])
    section.rows.append({"a": a_spec, "b": b_spec, "n_a": result.a.n, "n_b": result.b.n, "mean_a": result.a.mean,
                         "mean_b": result.b.mean, "difference": result.difference,
                         "difference_ci95": [result.ci_low, result.ci_high], "p_value": result.p_value,
                         "verdict": result.verdict})
    return section


def analysis_sections(trials_by_experiment: dict[str, list[LoggedTrial]]) -> list[Section]:
    summary = Section("Summary", SUMMARY_COLUMNS,
                      [summary_row(name, trials) for name, trials in trials_by_experiment.items()])
    sections = [summary]
    for name, trials in trials_by_experiment.items():
        if not finished(trials):
            continue
        sections.append(top_trials(name, trials))
        if searched_keys(trials):
            sections.append(by_parameter(name, trials))
    return sections


@dataclass
class AnalysisRequest:
    tracking_uri: str
    experiments: list[str]
    all_experiments: bool = False
    compare: list[str] | None = None
    metric: str = "test_accuracy"
    plots_dir: str | None = None
    report_path: str | None = None


@dataclass
class AnalysisResult:
    sections: list[Section]
    plots: list[str] = field(default_factory=list)
    report: str | None = None


def run_analysis(request: AnalysisRequest) -> AnalysisResult:
    """Everything `fmnist analyze` does: read the runs, compute the sections, write plots and report."""
    from fmnist_hpo.tracking import RunReader

    reader = RunReader(request.tracking_uri)
    names = reader.experiments() if request.all_experiments else list(dict.fromkeys(request.experiments))
    if request.compare:
        names += [parse_group(spec)[0] for spec in request.compare if parse_group(spec)[0] not in names]
    if not names:
        raise AnalysisError("no experiments to analyse: name one with --experiment, or use --all")
    trials = {name: reader.trials(name) for name in names}
    if not any(finished(t) for t in trials.values()):
        raise AnalysisError(f"{', '.join(names)}: no finished runs yet")
    sections = analysis_sections(trials)
    if request.compare:
        sections.append(_comparison(request, trials))
    result = AnalysisResult(sections)
    if request.plots_dir:
        from fmnist_hpo.plots import write_plots

        result.plots = [str(p) for p in write_plots(reader, trials, Path(request.plots_dir))]
    if request.report_path:
        from fmnist_hpo.checkpoints import atomic_write
        from fmnist_hpo.report import build_report

        text = build_report(trials, {n: reader.sweep_description(n) for n in names}, request.tracking_uri)
        atomic_write(Path(request.report_path), lambda tmp: tmp.write_text(text))
        result.report = request.report_path
    return result


def _comparison(request: AnalysisRequest, trials: dict[str, list[LoggedTrial]]) -> Section:
    if len(request.compare) != 2:
        raise AnalysisError("--compare takes exactly two groups: --compare A B")
    (a_spec, b_spec) = request.compare
    groups = []
    for spec in (a_spec, b_spec):
        name, key, value = parse_group(spec)
        members = select_group(trials[name], key, value)
        if not members:
            raise AnalysisError(f"--compare {spec!r}: no finished runs match")
        groups.append(members)
    return comparison_section(a_spec, groups[0], b_spec, groups[1], request.metric)
