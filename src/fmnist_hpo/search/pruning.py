"""Median pruning for the sequential engine: stop a trial that is already worse than most earlier ones."""

from __future__ import annotations

import statistics


class MedianPruner:
    """Stops a trial whose best metric so far at epoch e is worse than the median of earlier trials at e.

    Curves hold the best-so-far of the objective (lower is better) per epoch. A trial is never pruned
    before grace_epochs epochs, nor before two earlier trials have reached that epoch.
    """

    MIN_EARLIER_TRIALS = 2

    def __init__(self, grace_epochs: int) -> None:
        self.grace_epochs = grace_epochs
        self.curves: list[list[float]] = []

    def should_prune(self, curve: list[float]) -> bool:
        epoch = len(curve) - 1
        if epoch + 1 < self.grace_epochs:
            return False
        earlier = [c[epoch] for c in self.curves if len(c) > epoch]
        if len(earlier) < self.MIN_EARLIER_TRIALS:
            return False
        return curve[epoch] > statistics.median(earlier)

    def record(self, curve: list[float]) -> None:
        if curve:
            self.curves.append(list(curve))


def best_so_far(objectives: list[float]) -> list[float]:
    """[3, 1, 2] -> [3, 1, 1]: the running minimum of per-epoch objectives."""
    curve: list[float] = []
    for value in objectives:
        curve.append(value if not curve else min(curve[-1], value))
    return curve
