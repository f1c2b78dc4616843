"""What accuracy costs: Pareto fronts of validation accuracy against parameters and training seconds,
and how long each configuration took to first reach given validation accuracies.

A point is a configuration (a sweep's point, its repeats averaged), since a configuration is what a
reader would choose; the front holds the configurations no other one beats on both accuracy and cost.
Everything is on validation, like selection; test accuracy is shown beside it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter

from fmnist_hpo.analysis.analyze import finished, searched_keys
from fmnist_hpo.analysis.render import Section
from fmnist_hpo.milestones import epochs_key, seconds_key, targets_in
from fmnist_hpo.records import LoggedTrial

ACROSS_EXPERIMENTS = "all experiments"  # what plots and reports file the figures of every experiment together under
FRONT_RULE = "a configuration (repeats averaged) is on a front when no other has its validation accuracy for less"


@dataclass(frozen=True)
class Configuration:
    """One configuration of an experiment and its finished runs."""

    experiment: str
    runs: list[LoggedTrial]

    @property
    def first(self) -> LoggedTrial:
        return min(self.runs, key=lambda t: (t.number, t.repeat))

    def mean(self, value: Callable[[LoggedTrial], float]) -> float:
        values = [value(t) for t in self.runs]
        return statistics.fmean(values) if values and all(math.isfinite(v) for v in values) else math.nan

    @property
    def val_accuracy(self) -> float:
        return self.mean(lambda t: t.metrics.get("kept_val_accuracy", math.nan))

    @property
    def parameters(self) -> float:
        return self.mean(lambda t: t.metrics.get("total_parameters", math.nan))

    @property
    def seconds(self) -> float:
        return self.mean(lambda trial: trial.trial_seconds)


def configurations(experiment: str, trials: list[LoggedTrial]) -> list[Configuration]:
    groups: dict[tuple[str, int], list[LoggedTrial]] = {}
    for t in finished(trials):
        groups.setdefault(t.config_key, []).append(t)
    return sorted((Configuration(experiment, runs) for runs in groups.values()), key=lambda c: c.first.number)


def front(points: list[Configuration], cost: Callable[[Configuration], float]) -> list[Configuration]:
    """The points on the Pareto front of (lower cost, higher validation accuracy), cheapest first."""
    usable = [p for p in points if math.isfinite(cost(p)) and math.isfinite(p.val_accuracy)]
    best = -math.inf
    kept = []
    for p in sorted(usable, key=lambda p: (cost(p), -p.val_accuracy)):
        if p.val_accuracy > best:
            kept.append(p)
            best = p.val_accuracy
    return kept


FRONTS = (("parameters", attrgetter("parameters")), ("seconds", attrgetter("seconds")))


def spans_experiments(trials_by_experiment: dict[str, list[LoggedTrial]]) -> bool:
    """Whether a front across experiments says anything: two or more of them have finished runs."""
    return sum(bool(finished(trials)) for trials in trials_by_experiment.values()) > 1


def pareto_section(title: str, trials_by_experiment: dict[str, list[LoggedTrial]]) -> Section:
    """The configurations on either front, by parameters; `front` says which front(s) each is on."""
    points = [c for name, trials in trials_by_experiment.items() for c in configurations(name, trials)]
    on = {name: {id(c) for c in front(points, cost)} for name, cost in FRONTS}
    several = len(trials_by_experiment) > 1
    keys = [] if several else searched_keys([t for c in points for t in c.runs])
    section = Section(f"{title}: Pareto fronts of validation accuracy vs parameters and vs training seconds",
                      [*(["experiment"] if several else []), "trial", "n", *keys, "total_parameters", "trial_seconds",
                       "kept_val_accuracy", "test_accuracy", "front"])
    for c in sorted(points, key=lambda c: (c.parameters, c.seconds)):
        fronts = [name for name, _ in FRONTS if id(c) in on[name]]
        if not fronts:
            continue
        section.rows.append({"experiment": c.experiment, "trial": c.first.number, "n": len(c.runs),
                             **{k: c.first.values.get(k) for k in keys}, "total_parameters": c.parameters,
                             "trial_seconds": c.seconds, "kept_val_accuracy": c.val_accuracy,
                             "test_accuracy": c.mean(lambda t: t.metrics.get("test_accuracy", math.nan)),
                             "front": " and ".join(fronts)})
    return section


def time_to_accuracy_section(experiment: str, trials: list[LoggedTrial]) -> Section | None:
    """Per configuration: seconds and epochs to first reach each target (mean over its runs; '-' where
    not every run reached it). None when no trial logged a target (stores written before they existed)."""
    done = finished(trials)
    targets = targets_in(t.metrics for t in done)
    if not targets:
        return None
    keys = searched_keys(done)
    columns = [col for target in targets for col in (target_column(target, "seconds"), target_column(target, "epochs"))]
    section = Section(f"{experiment}: time to validation accuracy (per configuration, mean over its runs; "
                      "-: not reached by every run)", ["trial", "n", *keys, *columns, "kept_val_accuracy"])
    for c in configurations(experiment, trials):
        row = {"trial": c.first.number, "n": len(c.runs), **{k: c.first.values.get(k) for k in keys},
               "kept_val_accuracy": c.val_accuracy}
        for target in targets:
            for unit, key in (("seconds", seconds_key(target)), ("epochs", epochs_key(target))):
                row[target_column(target, unit)] = c.mean(lambda t, key=key: t.metrics.get(key, math.nan))
        section.rows.append(row)
    return section


def target_column(target: float, unit: str) -> str:
    """'to_90_seconds': a column name the renderer formats by its suffix."""
    return f"to_{seconds_key(target).rsplit('_acc_', 1)[1]}_{unit}"


def cost_sections(experiment: str, trials: list[LoggedTrial]) -> list[Section]:
    sections = [pareto_section(experiment, {experiment: trials})]
    timing = time_to_accuracy_section(experiment, trials)
    return sections + ([timing] if timing else [])
