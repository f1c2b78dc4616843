"""What fit() tells the code that runs a trial, and the one thing it asks: each a no-op here.

A caller subclasses FitHooks and overrides what it needs: the sweep logs every epoch, saves the
training state and prunes; a Ray worker reports to Tune; a test keeps the states it is handed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fmnist_hpo.records import EpochMetrics


class FitHooks:
    def steps_done(self, done: int, total: int) -> None:
        """Progress within an epoch, about 100 times an epoch (a CPU epoch can take minutes)."""

    def epoch_done(self, metrics: EpochMetrics, state: Callable[[], dict[str, Any]]) -> None:
        """An epoch ended; state() is everything needed to continue (training_state): passed back to
        fit as resume, it continues from the next epoch with the same result."""

    def should_prune(self, metrics: EpochMetrics) -> bool:
        """True ends training after this epoch, like early stopping does (never asked after the last)."""
        return False
