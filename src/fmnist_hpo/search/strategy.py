"""Which configurations a sweep trains: every point of a grid (or of a space smaller than max_evals),
or what Hyperopt proposes; and the rule both engines keep, that a configuration proposed again is
answered from its stored result instead of trained, so max_evals counts distinct configurations.

The strategy only chooses: train(values) runs a configuration (its repeats) and returns its mean
objective, None where every run of it failed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from fmnist_hpo.config.space import MAX_REPEATED_PROPOSALS, config_key, grid_points, plain_values, space_size
from fmnist_hpo.search.hyperopt_space import add_to_history, to_hyperopt

if TYPE_CHECKING:
    from fmnist_hpo.config.sections import SearchConfig

Train = Callable[[dict[str, Any]], float | None]


class Trained:
    """The configurations trained (or training) so far, each with its mean objective (None: failed, or
    not finished), and how many proposals in a row named one of them."""

    def __init__(self) -> None:
        self.losses: dict[tuple, tuple[dict[str, Any], float | None]] = {}  # config key -> (values, loss)
        self.repeated = 0

    def __len__(self) -> int:
        return len(self.losses)

    def is_new(self, values: dict[str, Any]) -> bool:
        """Whether a proposal is a configuration not trained yet; one that is not counts as a repeat."""
        if config_key(values) in self.losses:
            self.repeated += 1
            return False
        self.repeated = 0
        return True

    def record(self, values: dict[str, Any], loss: float | None) -> None:
        self.losses[config_key(values)] = (values, loss)

    def loss(self, values: dict[str, Any]) -> float | None:
        """The stored answer to a configuration proposed again."""
        return self.losses[config_key(values)][1]

    @property
    def exhausted(self) -> bool:
        return self.repeated >= MAX_REPEATED_PROPOSALS


def exhausted_note(algo: str, repeated: int, trained: int, max_evals: int) -> str:
    return (f"{algo} proposed only configurations already trained, {repeated} times in a row: "
            f"stopped after {trained} distinct configurations of {max_evals}")


def explore(search: SearchConfig, trained: Trained, train: Train) -> str | None:
    """Train the configurations the search still needs; a note where it ends short of max_evals."""
    size = space_size(search.space)
    if search.algo == "grid" or (size is not None and size <= search.max_evals):
        for values in grid_points(search.space):
            if config_key(values) not in trained.losses:
                trained.record(values, train(values))
        if search.space and search.algo != "grid" and size < search.max_evals:
            return (f"the search space holds only {size} configurations: each was trained once "
                    f"(search.max_evals {search.max_evals})")
        return None
    return hyperopt_search(search, trained, train)


def hyperopt_search(search: SearchConfig, trained: Trained, train: Train) -> str | None:
    """Hyperopt's proposals, told every result so far, until max_evals distinct configurations are trained."""
    from hyperopt import STATUS_FAIL, STATUS_OK, Trials, anneal, fmin, rand, tpe
    from hyperopt.exceptions import AllTrialsFailed

    logging.getLogger("hyperopt").setLevel(logging.CRITICAL)  # a trial's error is ours to report, once
    history = Trials()
    for values, loss in trained.losses.values():
        add_to_history(history, search.space, values, loss)
    history.refresh()
    if len(trained) >= search.max_evals:
        return None

    def evaluate(point: dict[str, Any]) -> dict[str, Any]:
        values = plain_values(point)
        if trained.is_new(values):
            trained.record(values, train(values))
        loss = trained.loss(values)
        return {"status": STATUS_FAIL} if loss is None else {"status": STATUS_OK, "loss": loss}

    def enough(_: Any, *args: Any) -> tuple[bool, Any]:
        return len(trained) >= search.max_evals or trained.exhausted, args

    algo = {"tpe": tpe, "random": rand, "anneal": anneal}[search.algo].suggest
    # a resumed search draws from a new stream, or random search would repeat its first points
    rstate = np.random.default_rng([search.seed, len(history.trials)] if history.trials else search.seed)
    budget = len(history.trials) + (search.max_evals - len(trained)) * (MAX_REPEATED_PROPOSALS + 1)
    with contextlib.suppress(AllTrialsFailed):  # every failure is recorded; run_from_config reports it
        fmin(evaluate, to_hyperopt(search.space), algo=algo, max_evals=budget, trials=history, rstate=rstate,
             early_stop_fn=enough, show_progressbar=False, return_argmin=False)
    if len(trained) < search.max_evals:
        return exhausted_note(search.algo, trained.repeated, len(trained), search.max_evals)
    return None
