"""`fmnist analyze`: read the runs, compute the sections, write plots and a findings report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fmnist_hpo.analyze import AnalysisError, analysis_sections, comparison_section, finished, parse_group, select_group
from fmnist_hpo.records import LoggedTrial
from fmnist_hpo.render import Section

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
        from fmnist_hpo.report import build_report, write_report
        from fmnist_hpo.study import is_study
        from fmnist_hpo.study_report import build_study_report

        descriptions = {n: reader.sweep_description(n) for n in names}
        report_path = Path(request.report_path)
        if is_study(names):
            text = build_study_report(trials, descriptions, request.tracking_uri, report_path, result.plots)
        else:
            text = build_report(trials, descriptions, request.tracking_uri)
        write_report(report_path, text)
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
