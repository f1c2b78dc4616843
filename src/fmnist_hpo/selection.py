"""The one definition of honest selection: what a trial keeps and what a sweep picks.

A trial keeps the epoch with the best value of the sweep's metric on the validation split; its
checkpoint, its objective and its test score all come from that epoch. A sweep picks the
configuration whose finished, unpruned runs have the best mean objective; with repeats, its figures
are means over those runs. Nothing here ever looks at a test metric to choose.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

METRICS = ("val_accuracy", "val_loss")


def maximizes(metric: str) -> bool:
    return metric == "val_accuracy"


def objective(metric: str, val_loss: float, val_accuracy: float) -> float:
    """What the search minimises: val_loss, or minus val_accuracy."""
    return val_loss if metric == "val_loss" else -val_accuracy


class Epoch(Protocol):
    val_loss: float
    val_accuracy: float


def kept_epoch(history: Sequence[Epoch], metric: str) -> int:
    """Index of the first epoch with the best value of metric (-1 for no epochs)."""
    values = [objective(metric, m.val_loss, m.val_accuracy) for m in history]
    finite = [i for i, v in enumerate(values) if math.isfinite(v)]
    return min(finite, key=lambda i: (values[i], i), default=-1)


class Run(Protocol):
    """A trial as selection sees it; both the live TrialRecord and the stored LoggedTrial are one."""

    run_id: str
    number: int
    repeat: int

    @property
    def config_key(self) -> Hashable: ...

    def eligible(self) -> bool: ...

    def objective(self, metric: str) -> float: ...


@dataclass
class Selection:
    """The selected configuration: its runs (repeats), and the run whose model stands for it."""

    runs: list[Any]  # the configuration's eligible runs (Run), one per repeat
    representative: Any  # the Run with the best validation objective: its model is evaluated and registered
    mean_objective: float

    def values(self, value_of: Callable[[Any], float]) -> list[float]:
        return [v for v in (value_of(r) for r in self.runs) if v is not None and math.isfinite(v)]

    def mean(self, value_of: Callable[[Any], float]) -> float:
        values = self.values(value_of)
        return statistics.fmean(values) if values else math.nan

    def std(self, value_of: Callable[[Any], float]) -> float:
        values = self.values(value_of)
        return statistics.stdev(values) if len(values) > 1 else math.nan


def select(runs: Sequence[Run], metric: str) -> Selection | None:
    """The configuration with the best mean validation objective over its runs, or None.

    Only configurations whose every run is eligible compete: one whose weak repeats were pruned
    or failed must not be scored on its lucky repeat alone.
    """
    groups: dict[Hashable, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.config_key, []).append(run)
    groups = {key: members for key, members in groups.items()
              if all(r.eligible() and math.isfinite(r.objective(metric)) for r in members)}
    if not groups:
        return None
    means = {key: statistics.fmean(r.objective(metric) for r in members) for key, members in groups.items()}
    best_key = min(means, key=lambda key: (means[key], min(r.number for r in groups[key])))
    members = sorted(groups[best_key], key=lambda r: r.repeat)
    representative = min(members, key=lambda r: (r.objective(metric), r.number))
    return Selection(members, representative, means[best_key])
