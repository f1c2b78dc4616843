"""Logged trials -> sections of numbers (summary, top trials, per-parameter, comparisons).

Every section is plain data (render.Section); render.py turns the same sections into a table,
markdown, CSV or JSON. Selection and every ranking use the validation split (selection.py); test
accuracy is only ever reported. Significance verdicts are given only where the design supports them.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from typing import Any

from fmnist_hpo.analysis.render import Section
from fmnist_hpo.analysis.stats import Comparison, Trend, compare, summarize, trend
from fmnist_hpo.errors import FmnistError
from fmnist_hpo.records import TRIAL_SECONDS, LoggedTrial
from fmnist_hpo.selection import Selection, select
from fmnist_hpo.tags import INTERRUPTED, PRUNED, UNFINISHED, RunStatus, flagged, was_abandoned

MAX_GROUPS = 8  # more distinct values (more than 4 for a continuous one) are grouped into quartile ranges
# space primitives whose values are numbers on a line: analysed as a trend, not as groups of one run each
CONTINUOUS_PRIMITIVES = ("uniform", "loguniform", "quniform", "qloguniform", "normal", "randint")
LOG_PRIMITIVES = ("loguniform", "qloguniform")


class AnalysisError(FmnistError):
    """An analysis request that the logged runs cannot answer."""


def finished(trials: list[LoggedTrial]) -> list[LoggedTrial]:
    """Trials that trained to their end and were tested; pruned ones (cut short, on either engine) are not."""
    return [t for t in trials
            if t.status == RunStatus.FINISHED and "test_accuracy" in t.metrics and not flagged(t.tags, PRUNED)]


def metric_values(trials: list[LoggedTrial], key: str) -> list[float]:
    return [t.metrics[key] for t in trials if key in t.metrics]


def search_metric(trials: list[LoggedTrial]) -> str:
    return trials[0].search_metric if trials else "val_accuracy"


def selection_of(trials: list[LoggedTrial]) -> Selection | None:
    """The configuration the validation split selects, by the sweep's own metric (never the test set)."""
    return select(trials, search_metric(trials))


def has_repeats(trials: list[LoggedTrial]) -> bool:
    return any(t.repeat for t in trials)


def outcome_of(trial: LoggedTrial) -> str:
    """finished, pruned, failed or cut off (interrupted: killed, left running, or closed to be run again)."""
    if flagged(trial.tags, INTERRUPTED) or trial.status in UNFINISHED:
        return "cut off"
    if trial.status == RunStatus.FAILED:  # abandoned: interrupted, then a fresh sweep of its config was started instead
        return "cut off" if was_abandoned(trial.tags) else "failed"
    if flagged(trial.tags, PRUNED):
        return "pruned"
    return "finished" if "test_accuracy" in trial.metrics else "cut off"


def outcome_counts(trials: list[LoggedTrial]) -> dict[str, int]:
    """Every trial run in exactly one outcome, so the counts add up to the runs read."""
    outcomes = [outcome_of(t) for t in trials]
    return {name.replace(" ", "_"): outcomes.count(name) for name in ("finished", "pruned", "failed", "cut off")}


def summary_row(experiment: str, trials: list[LoggedTrial]) -> dict[str, Any]:
    done = finished(trials)
    chosen = selection_of(trials)
    val, test = summarize(metric_values(done, "kept_val_accuracy")), summarize(metric_values(done, "test_accuracy"))
    gaps = [t.metrics["kept_train_accuracy"] - t.metrics["test_accuracy"] for t in done if "kept_train_accuracy" in t.metrics]
    return {
        "experiment": experiment,
        **outcome_counts(trials),
        "selected_runs": len(chosen.runs) if chosen else 0,
        "selected_val_accuracy": chosen.mean(lambda t: t.metrics["kept_val_accuracy"]) if chosen else math.nan,
        "selected_test_accuracy": chosen.mean(lambda t: t.metrics["test_accuracy"]) if chosen else math.nan,
        "selected_test_std": chosen.std(lambda t: t.metrics["test_accuracy"]) if chosen else math.nan,
        "val_mean": val.mean, "val_std": val.std, "val_ci95": [val.ci_low, val.ci_high],
        "test_mean": test.mean, "test_std": test.std, "test_ci95": [test.ci_low, test.ci_high],
        "median_parameters": _median(metric_values(done, "total_parameters")),
        "median_trial_seconds": _median(metric_values(done, TRIAL_SECONDS)),
        "median_epochs": _median(metric_values(done, "epochs_run")),
        "mean_gap": statistics.fmean(gaps) if gaps else math.nan,
    }


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


SUMMARY_COLUMNS = list(summary_row("", []).keys())


def ranked_by_validation(trials: list[LoggedTrial]) -> list[LoggedTrial]:
    """Finished trials, best first by the sweep's metric on validation; ties in trial order."""
    metric = search_metric(trials)
    return sorted(finished(trials), key=lambda t: (_nan_last(t.objective(metric)), t.number))


def _nan_last(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def top_trials(experiment: str, trials: list[LoggedTrial], limit: int = 5) -> Section:
    keys = searched_keys(trials)
    repeat = ["repeat"] if has_repeats(trials) else []
    section = Section(f"{experiment}: top trials by validation ({search_metric(trials)})",
                      ["trial", *repeat, *keys, "kept_val_accuracy", "test_accuracy", "epochs_run", "total_parameters"])
    for t in ranked_by_validation(trials)[:limit]:
        section.rows.append({"trial": t.number, "repeat": t.repeat, **{k: t.values.get(k) for k in keys},
                             "kept_val_accuracy": t.metrics.get("kept_val_accuracy"),
                             "test_accuracy": t.metrics.get("test_accuracy"),
                             "epochs_run": t.metrics.get("epochs_run"), "total_parameters": t.metrics.get("total_parameters")})
    return section


def searched_keys(trials: list[LoggedTrial]) -> list[str]:
    return list(dict.fromkeys(k for t in trials for k in t.values))


def space_of(trials: list[LoggedTrial]) -> dict[str, str]:
    """Searched key -> its space primitive (loguniform, choice, ...), as the sweeps logged their space;
    for a key no logged space names, inferred from its values: many distinct numbers are continuous,
    and positive ones over two decades or more are taken as log-scaled."""
    kinds: dict[str, str] = {}
    for raw in dict.fromkeys(t.params.get("search.space", "") for t in trials):
        try:
            space = json.loads(raw) if raw else {}
        except ValueError:
            continue  # a space too long for MLflow's param limit was cut off: infer from the values
        for key, entry in space.items() if isinstance(space, dict) else ():
            if isinstance(entry, dict) and len(entry) == 1:
                kinds.setdefault(key, next(iter(entry)))
    for key in searched_keys(trials):
        kinds.setdefault(key, _inferred_kind([t.values[key] for t in trials if key in t.values]))
    return kinds


def _inferred_kind(values: list[Any]) -> str:
    distinct = {_hashable(v) for v in values}
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in distinct):
        return "choice"
    if len(distinct) <= MAX_GROUPS and all(float(v).is_integer() for v in distinct):
        return "choice"
    if min(distinct) > 0 and max(distinct) / min(distinct) >= 100:
        return "loguniform"
    return "uniform"


def continuous_keys(trials: list[LoggedTrial]) -> list[str]:
    kinds = space_of(trials)
    return [k for k in searched_keys(trials) if kinds.get(k) in CONTINUOUS_PRIMITIVES]


def discrete_keys(trials: list[LoggedTrial]) -> list[str]:
    continuous = continuous_keys(trials)
    return [k for k in searched_keys(trials) if k not in continuous]


def is_log_scaled(trials: list[LoggedTrial], key: str) -> bool:
    return space_of(trials).get(key) in LOG_PRIMITIVES


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
    for key in discrete_keys(trials):
        for label, members in parameter_groups(trials, key):
            val = summarize(metric_values(members, "kept_val_accuracy"))
            test = summarize(metric_values(members, "test_accuracy"))
            section.rows.append({"parameter": key, "value": label, "n": val.n, "val_mean": val.mean,
                                 "val_std": val.std, "test_mean": test.mean, "test_std": test.std})
    return section


def trend_of(trials: list[LoggedTrial], key: str, metric: str = "kept_val_accuracy") -> Trend:
    done = [t for t in finished(trials) if key in t.values and metric in t.metrics]
    return trend([float(t.values[key]) for t in done], [t.metrics[metric] for t in done], is_log_scaled(trials, key))


def trends(experiment: str, trials: list[LoggedTrial]) -> Section:
    """Per continuous searched key: how validation accuracy moves with it, over every finished run."""
    section = Section(f"{experiment}: validation accuracy against continuous parameters (Spearman's rho; "
                      "line slope, per decade on a log scale)",
                      ["parameter", "scale", "range", "n", "rho", "p_value", "slope", "r_squared"])
    for key in continuous_keys(trials):
        values = [t.values[key] for t in finished(trials) if key in t.values]
        log = is_log_scaled(trials, key)
        result = trend_of(trials, key)
        section.rows.append({"parameter": key, "scale": "log" if log else "linear",
                             "range": f"{_label(float(min(values)))}–{_label(float(max(values)))}" if values else "-",
                             "n": result.n, "rho": result.rho, "p_value": result.p_value, "slope": result.slope,
                             "r_squared": result.r_squared})
    return section


# --- comparisons: a test only where the design supports one -----------------------------------------


def design_of(group: list[LoggedTrial]) -> str | None:
    """Why a group's runs differ only by chance: 'repeats' (one configuration, several seeds) or 'grid'
    (a value of a grid search, crossed evenly with every other value); None for runs a TPE, random or
    anneal search happened to sample, which differ in other keys too (exploratory only)."""
    if not group:
        return None
    if len({t.config_key for t in group}) == 1:
        return "repeats"
    if all(t.params.get("search.algo") == "grid" for t in group) and len({t.config_key[0] for t in group}) == 1:
        return "grid"
    return None


def supports_test(a: list[LoggedTrial], b: list[LoggedTrial]) -> bool:
    """Whether two groups differ only by the compared factor and chance: each one configuration's
    repeats, or two values of the same grid sweep (grids of different sweeps may cover other keys)."""
    designs = design_of(a), design_of(b)
    if designs == ("repeats", "repeats"):
        return True
    return designs == ("grid", "grid") and {t.config_key[0] for t in a} == {t.config_key[0] for t in b}


def tested_comparison(a: list[LoggedTrial], b: list[LoggedTrial], metric: str, a_name: str, b_name: str) -> Comparison:
    """Welch's comparison of two groups; its verdict is labelled exploratory when the design cannot support one."""
    result = compare(metric_values(a, metric), metric_values(b, metric), a_name, b_name)
    if supports_test(a, b):
        return result
    return result.exploratory(f"exploratory (n = {result.a.n} vs {result.b.n}): these runs were sampled by a search "
                              "and differ in other keys too, so no significance is claimed")


def comparison_section(a_spec: str, a_trials: list[LoggedTrial], b_spec: str, b_trials: list[LoggedTrial],
                       metric: str = "test_accuracy") -> Section:
    result = tested_comparison(a_trials, b_trials, metric, a_spec, b_spec)
    section = Section(f"{a_spec} vs {b_spec} ({metric})",
                      ["a", "b", "n_a", "n_b", "mean_a", "mean_b", "difference", "difference_ci95", "p_value", "verdict"])
    section.rows.append({"a": a_spec, "b": b_spec, "n_a": result.a.n, "n_b": result.b.n, "mean_a": result.a.mean,
                         "mean_b": result.b.mean, "difference": result.difference,
                         "difference_ci95": [result.ci_low, result.ci_high], "p_value": result.p_value,
                         "verdict": result.verdict})
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
