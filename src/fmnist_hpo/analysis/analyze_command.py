"""`fmnist analyze`: read the runs, compute the sections, write plots and a findings report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fmnist_hpo.analysis.analyze import (
    SUMMARY_COLUMNS,
    AnalysisError,
    by_parameter,
    comparison_section,
    continuous_keys,
    discrete_keys,
    finished,
    parse_group,
    select_group,
    summary_row,
    top_trials,
    trends,
)
from fmnist_hpo.analysis.costs import cost_sections, pareto_section, spans_experiments
from fmnist_hpo.analysis.render import Section
from fmnist_hpo.analysis.spec_diff import spec_difference
from fmnist_hpo.records import LoggedTrial

COMPARE_METRICS = ("test_accuracy", "kept_val_accuracy")


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
    from fmnist_hpo.tracking.reader import RunReader

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
        sections += _comparison(request, trials)
    result = AnalysisResult(sections)
    plots: dict[str, list[Path]] = {}
    if request.plots_dir:
        from fmnist_hpo.analysis.plots import write_plots

        plots = write_plots(reader, trials, Path(request.plots_dir))
        result.plots = [str(p) for paths in plots.values() for p in paths]
    if request.report_path:
        from fmnist_hpo.analysis.report import build_report, write_report
        from fmnist_hpo.analysis.study import is_study
        from fmnist_hpo.analysis.study_report import build_study_report

        descriptions = {n: reader.sweep_description(n) for n in names}
        report_path = Path(request.report_path)
        if is_study(names):
            text = build_study_report(trials, descriptions, request.tracking_uri, report_path, plots)
        else:
            text = build_report(trials, descriptions, request.tracking_uri, report_path, plots)
        write_report(report_path, text)
        result.report = request.report_path
    return result


def analysis_sections(trials_by_experiment: dict[str, list[LoggedTrial]]) -> list[Section]:
    summary = Section("Summary", SUMMARY_COLUMNS,
                      [summary_row(name, trials) for name, trials in trials_by_experiment.items()])
    sections = [summary]
    for name, trials in trials_by_experiment.items():
        if not finished(trials):
            continue
        sections.append(top_trials(name, trials))
        if discrete_keys(trials):
            sections.append(by_parameter(name, trials))
        if continuous_keys(trials):
            sections.append(trends(name, trials))
        sections += cost_sections(name, trials)
    if spans_experiments(trials_by_experiment):
        sections.append(pareto_section("All experiments", trials_by_experiment))
    return sections


def _comparison(request: AnalysisRequest, trials: dict[str, list[LoggedTrial]]) -> list[Section]:
    """The test of the difference, and beside it what differs between the groups' specs and machines."""
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
    return [comparison_section(a_spec, groups[0], b_spec, groups[1], request.metric),
            spec_difference(a_spec, groups[0], b_spec, groups[1])]
