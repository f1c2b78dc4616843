"""A findings report in markdown, written from the logged runs: one section per experiment, then conclusions.

Everything is chosen and ranked on validation; test accuracy is reported beside it. A difference
gets a significance verdict only where the design supports one (repeats of one configuration, or a
grid); other comparisons are labelled exploratory.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from fmnist_hpo.analysis.analyze import (
    by_parameter,
    continuous_keys,
    discrete_keys,
    finished,
    is_log_scaled,
    metric_values,
    outcome_counts,
    parameter_groups,
    searched_keys,
    selection_of,
    summary_row,
    supports_test,
    tested_comparison,
    top_trials,
    trend_of,
    trends,
)
from fmnist_hpo.analysis.costs import ACROSS_EXPERIMENTS, FRONT_RULE, cost_sections, pareto_section, spans_experiments
from fmnist_hpo.analysis.render import Section, format_value, to_markdown
from fmnist_hpo.analysis.stats import describe_trend, summarize
from fmnist_hpo.files import atomic_write
from fmnist_hpo.percent import percent
from fmnist_hpo.records import LoggedTrial

OVERVIEW_COLUMNS = ["experiment", "finished", "pruned", "failed", "cut_off", "selected_runs", "selected_val_accuracy",
                    "selected_test_accuracy", "selected_test_std", "test_mean", "test_std", "test_ci95",
                    "median_parameters", "median_epochs"]


def runs_line(trials_by_experiment: dict[str, list[LoggedTrial]]) -> str:
    """'12 trial runs (10 finished, 1 pruned, 1 failed, 0 cut off)': the same counts as the tables."""
    counts = outcome_counts([t for trials in trials_by_experiment.values() for t in trials])
    total = sum(counts.values())
    return f"{total} trial run{'s' if total != 1 else ''} ({counts_text(counts)})"


def counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {name.replace('_', ' ')}" for name, n in counts.items())


def plot_lines(paths: list[Path] | None, report_path: Path) -> list[str]:
    """Each plot embedded by its path relative to the report, so the report and its folder travel together."""
    return [f"![{p.stem}]({os.path.relpath(p, report_path.parent)})" for p in paths or []]


def _points(value: float) -> str:
    return f"{value * 100:+.2f} points"


def selection_line(trials: list[LoggedTrial]) -> str:
    chosen = selection_of(trials)
    if chosen is None:
        return "No finished, unpruned trial to select."
    rep = chosen.representative
    values = ", ".join(f"{k}={format_value(k, v)}" for k, v in rep.values.items()) or "the base config"
    val = chosen.mean(lambda t: t.metrics["kept_val_accuracy"])
    test = chosen.mean(lambda t: t.metrics["test_accuracy"])
    if len(chosen.runs) == 1:
        return f"The validation split selects trial {rep.number} ({values}): validation {percent(val)}, test {percent(test)}."
    spread = chosen.std(lambda t: t.metrics["test_accuracy"]) * 100
    return (f"The validation split selects {values} (mean over its {len(chosen.runs)} repeats): validation {percent(val)}, "
            f"test {percent(test)} ± {spread:.2f} points (std).")


def experiment_section(name: str, description: str, trials: list[LoggedTrial], figures: list[str] | None = None) -> str:
    lines = [f"## {name}", ""]
    if description:
        lines += [f"_{description}_", ""]
    done = finished(trials)
    if not done:
        return "\n".join([*lines, "No finished runs.", ""])
    row = summary_row(name, trials)
    test = summarize(metric_values(done, "test_accuracy"))
    lines += [
        f"- {len(trials)} trial runs: {counts_text(outcome_counts(trials))}.",
        f"- {selection_line(trials)}",
        f"- Test accuracy over all runs: {percent(test.mean)}"
        + (f" ± {test.std * 100:.2f} points (95% CI {percent(test.ci_low)} to {percent(test.ci_high)})" if test.n > 1 else "")
        + ".",
        f"- Median model size {format_value('median_parameters', row['median_parameters'])} parameters, "
        f"{format_value('median_epochs', row['median_epochs'])} epochs, "
        f"{format_value('median_trial_seconds', row['median_trial_seconds'])} s per trial (its epochs' training and validation); "
        f"mean generalisation gap (train accuracy at the kept epoch minus test accuracy) {_points(row['mean_gap'])}.",
    ]
    lines += [f"- {finding}" for finding in parameter_findings(trials)]
    lines += ["", to_markdown([top_trials(name, trials)], percent=True)]
    if discrete_keys(trials):
        lines.append(to_markdown([by_parameter(name, trials)], percent=True))
    if continuous_keys(trials):
        lines.append(to_markdown([trends(name, trials)], percent=True))
    lines += [to_markdown(cost_sections(name, trials), percent=True), f"_Pareto fronts: {FRONT_RULE}._", ""]
    if figures:
        lines += [*figures, ""]
    return "\n".join(lines)


def parameter_findings(trials: list[LoggedTrial]) -> list[str]:
    """Per searched key: the value with the best mean validation accuracy, against the runner-up."""
    findings = []
    others_vary = len(searched_keys(trials)) > 1
    for key in continuous_keys(trials):
        scale = "per tenfold change" if is_log_scaled(trials, key) else "per unit"
        text = describe_trend(trend_of(trials, key), "validation accuracy", scale)
        findings.append(f"{key}: {text}" + ("; exploratory, since the other searched keys vary too" if others_vary
                                            and "cannot" not in text else "") + ".")
    for key in discrete_keys(trials):
        groups = [(label, members) for label, members in parameter_groups(trials, key) if members]
        if len(groups) < 2:
            continue
        ranked = sorted(groups, key=lambda g: -summarize(metric_values(g[1], "kept_val_accuracy")).mean)
        (best_label, best), (next_label, runner_up) = ranked[0], ranked[1]
        result = tested_comparison(best, runner_up, "kept_val_accuracy", f"{key}={best_label}", f"{key}={next_label}")
        findings.append(f"{key}: {best_label} has the best mean validation accuracy; against {next_label}: {result.verdict}.")
    return findings


def conclusions(trials_by_experiment: dict[str, list[LoggedTrial]]) -> list[str]:
    """Experiments ranked by their selected configuration's mean validation accuracy, test beside it."""
    chosen = {name: selection_of(trials) for name, trials in trials_by_experiment.items()}
    ranked = sorted((name for name in chosen if chosen[name] is not None),
                    key=lambda name: -chosen[name].mean(lambda t: t.metrics["kept_val_accuracy"]))
    if not ranked:
        return ["No experiment has finished runs yet."]
    lines = [f"{i}. {name}: validation {percent(chosen[name].mean(lambda t: t.metrics['kept_val_accuracy']))}, "
             f"test {percent(chosen[name].mean(lambda t: t.metrics['test_accuracy']))} "
             f"(selected configuration, {len(chosen[name].runs)} run{'s' if len(chosen[name].runs) > 1 else ''})"
             for i, name in enumerate(ranked, start=1)]
    if len(ranked) > 1:
        a, b = ranked[0], ranked[1]
        runs_a, runs_b = chosen[a].runs, chosen[b].runs
        result = tested_comparison(runs_a, runs_b, "test_accuracy", a, b)
        basis = "their selected configurations' repeats" if supports_test(runs_a, runs_b) else "their selected runs"
        lines.append(f"\n{a} against {b} (the top two on validation), test accuracy over {basis}: {result.verdict}.")
    return lines


def build_report(trials_by_experiment: dict[str, list[LoggedTrial]], descriptions: dict[str, str],
                 tracking_uri: str, report_path: Path | None = None, plots: dict[str, list[Path]] | None = None) -> str:
    plots = plots or {}
    where = report_path or Path("report.md")
    overview = Section("Overview", OVERVIEW_COLUMNS,
                       [summary_row(name, trials) for name, trials in trials_by_experiment.items()])
    parts = [
        f"# Findings: {', '.join(trials_by_experiment)}",
        "",
        f"Generated by `fmnist analyze` on {time.strftime('%Y-%m-%d')} from {runs_line(trials_by_experiment)} "
        f"in `{tracking_uri}`. "
        "Each trial kept the epoch its sweep's metric chose on a validation split, and each sweep selected the "
        "configuration with the best mean validation result; the test set was scored once per trial and never "
        "used to choose or rank anything. Accuracies are percentages; differences are percentage points.",
        "",
        to_markdown([overview], level=2, percent=True),
    ]
    for name, trials in trials_by_experiment.items():
        parts.append(experiment_section(name, descriptions.get(name, ""), trials, plot_lines(plots.get(name), where)))
    parts += ["## Conclusions", "", *conclusions(trials_by_experiment), ""]
    if spans_experiments(trials_by_experiment):
        parts += [to_markdown([pareto_section("All experiments", trials_by_experiment)], level=2, percent=True),
                  f"_{FRONT_RULE}._", "", *plot_lines(plots.get(ACROSS_EXPERIMENTS), where), ""]
    return "\n".join(parts)


def write_report(path: Path, text: str) -> None:
    """Write the report atomically, with the mode a plain write (like the PNG plots') would give it:
    the temporary file atomic_write renames into place is private (0600)."""
    atomic_write(path, lambda tmp: tmp.write_text(text))
    path.chmod(0o666 & ~_umask())


def _umask() -> int:
    current = os.umask(0)  # the only way to read it is to set it
    os.umask(current)
    return current
