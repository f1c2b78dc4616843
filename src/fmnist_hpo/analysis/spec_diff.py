"""Why two groups of runs differ: the resolved config keys they do not share, their search spaces,
and the differences of environment (device, torch, data, code) that make a comparison unfair."""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter

from fmnist_hpo.analysis.render import Section
from fmnist_hpo.records import LoggedTrial
from fmnist_hpo.tags import DEVICE, GIT_COMMIT, TORCH_VERSION

NOT_THE_RECIPE = ("experiment", "description", "models_dir")  # names and paths, never a cause of a difference
NOT_THE_RECIPE_SECTIONS = ("mlflow.",)
SPACE_KEY = "search.space"
SHOWN_VALUES = 3


def _tag(name: str) -> Callable[[LoggedTrial], str | None]:
    return lambda trial: trial.tags.get(name)


# what it names -> (how a run records it, whether a difference changes what is measured; in the code it may)
ENVIRONMENT = {"device": (_tag(DEVICE), True), "torch version": (_tag(TORCH_VERSION), True),
               "data (IDX files digest)": (attrgetter("data_digest"), True),
               "code (git commit)": (_tag(GIT_COMMIT), False)}


def _distinct(group: list[LoggedTrial], read: Callable[[LoggedTrial], object]) -> tuple[str, ...]:
    return tuple(sorted({str(read(t)) for t in group if read(t) is not None}))


def _describe(values: tuple[str, ...], searched: bool) -> str:
    if not values:
        return "-"
    if searched:  # a searched key that happened to be sampled once is still searched, not fixed
        return f"searched (1 value: {values[0]})" if len(values) == 1 else f"searched ({len(values)} values)"
    if len(values) == 1:
        return values[0]
    shown = ", ".join(values[:SHOWN_VALUES]) + (", ..." if len(values) > SHOWN_VALUES else "")
    return f"{len(values)} values: {shown}"


def _config_keys(a: list[LoggedTrial], b: list[LoggedTrial]) -> list[str]:
    keys = {k for t in [*a, *b] for k in t.params}
    return sorted(k for k in keys if k != SPACE_KEY and k not in NOT_THE_RECIPE
                  and not k.startswith(NOT_THE_RECIPE_SECTIONS))


def spec_difference(a_name: str, a: list[LoggedTrial], b_name: str, b: list[LoggedTrial]) -> Section:
    """Rows of config keys whose values differ, then both search spaces, then the environment."""
    searched_a = {k for t in a for k in t.values}
    searched_b = {k for t in b for k in t.values}
    rows = []
    for key in _config_keys(a, b):
        values_a, values_b = (_distinct(g, lambda t, key=key: t.params.get(key)) for g in (a, b))
        if values_a != values_b:
            rows.append({"key": key, "a": _describe(values_a, key in searched_a),
                         "b": _describe(values_b, key in searched_b)})
    spaces = [_describe(_distinct(g, lambda t: t.params.get(SPACE_KEY)), False) for g in (a, b)]
    rows.append({"key": SPACE_KEY, "a": spaces[0] if spaces[0] != "{}" else "none (one configuration)",
                 "b": spaces[1] if spaces[1] != "{}" else "none (one configuration)"})
    unfair = []
    for label, (read, changes_the_measure) in ENVIRONMENT.items():
        values_a, values_b = (_distinct(g, read) for g in (a, b))
        if values_a != values_b:
            rows.append({"key": f"environment: {label}", "a": _describe(values_a, False),
                         "b": _describe(values_b, False)})
            unfair += [label] if changes_the_measure else []
    fairness = (f"not like for like: {', '.join(unfair)} differ" if unfair else
                "same device, torch version and data")
    return Section(f"{a_name} vs {b_name}: what differs ({fairness})", ["key", "a", "b"], rows)
