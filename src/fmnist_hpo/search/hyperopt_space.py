"""The validated YAML space as Hyperopt sees it: its expressions, and its history rebuilt from logged trials."""

from __future__ import annotations

import math
from typing import Any

from hyperopt import JOB_STATE_DONE, STATUS_FAIL, STATUS_OK, hp

from fmnist_hpo.config.space import parse_entry


def to_hyperopt(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The validated YAML space as a dict of Hyperopt expressions, labelled by dotted key."""
    expressions = {}
    for key, spec in space.items():
        kind, args = parse_entry(key, spec)
        if kind == "choice":
            expressions[key] = hp.choice(key, args)
        elif kind == "loguniform":
            expressions[key] = hp.loguniform(key, math.log(args[0]), math.log(args[1]))
        elif kind == "qloguniform":
            expressions[key] = hp.qloguniform(key, math.log(args[0]), math.log(args[1]), args[2])
        elif kind == "randint":
            expressions[key] = hp.randint(key, int(args[0]), int(args[1]))
        else:
            expressions[key] = getattr(hp, kind)(key, *args)
    return expressions


def to_hyperopt_vals(space: dict[str, dict[str, Any]], values: dict[str, Any]) -> dict[str, list[Any]]:
    """Real values -> Hyperopt's stored form (a choice is stored as its index), to rebuild a history."""
    vals = {}
    for key, spec in space.items():
        kind, args = parse_entry(key, spec)
        value = values[key]
        vals[key] = [args.index(value) if kind == "choice" else value]
    return vals


def add_to_history(trials: Any, space: dict[str, dict[str, Any]], values: dict[str, Any], loss: float | None) -> None:
    """Record an evaluated point in Hyperopt Trials (loss None: a failed point), as fmin would have."""
    (tid,) = trials.new_trial_ids(1)
    misc = {"tid": tid, "cmd": ("domain_attachment", "FMinIter_Domain"), "workdir": None,
            "idxs": {key: [tid] for key in space}, "vals": to_hyperopt_vals(space, values)}
    outcome = {"status": STATUS_FAIL} if loss is None else {"status": STATUS_OK, "loss": loss}
    doc = trials.new_trial_docs([tid], [None], [outcome], [misc])[0]
    doc["state"] = JOB_STATE_DONE
    trials.insert_trial_docs([doc])
