"""The YAML search space: its primitives, checks, grid and points (search.hyperopt_space builds Hyperopt's).

In YAML a space maps a dotted config key to one primitive and its arguments, with bounds in the
units of the value itself (loguniform [1e-4, 1e-2], not log bounds):

    search:
      space:
        model.filters: {choice: [128, 192, 256]}
        train.lr: {loguniform: [1.0e-4, 1.0e-2]}
        model.dense1_dropout: {quniform: [0.0, 0.5, 0.05]}

Nothing here imports Hyperopt, so validation stays light.
"""

from __future__ import annotations

import math
from typing import Any

from fmnist_hpo.config.problems import shown

# primitive -> argument names, in the order the YAML list gives them
PRIMITIVES: dict[str, tuple[str, ...]] = {
    "choice": ("options",),
    "uniform": ("low", "high"),
    "loguniform": ("low", "high"),
    "quniform": ("low", "high", "q"),
    "qloguniform": ("low", "high", "q"),
    "randint": ("low", "high"),
    "normal": ("mu", "sigma"),
}

# a search proposing only configurations already trained this many times in a row has nothing new
MAX_REPEATED_PROPOSALS = 200

# keys a search must not move: they define the sweep itself, not a trial
FIXED_KEYS = ("experiment", "description", "models_dir", "data.dataset")  # one sweep, one dataset
FIXED_SECTIONS = ("search.", "mlflow.")


def parse_entry(key: str, spec: Any) -> tuple[str, list[Any]]:
    """{'loguniform': [1e-4, 1e-2]} -> ('loguniform', [1e-4, 1e-2]); ValueError when malformed."""
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ValueError(f"must be one primitive and its arguments, e.g. {{choice: [1, 2]}}; got {shown(spec)}")
    (kind, args), = spec.items()
    if kind not in PRIMITIVES:
        raise ValueError(f"unknown primitive {shown(kind)}; use one of {', '.join(PRIMITIVES)}")
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ValueError("choice needs a non-empty list of options")
        return kind, args
    names = PRIMITIVES[kind]
    if not isinstance(args, list) or len(args) != len(names):
        raise ValueError(f"{kind} takes [{', '.join(names)}], got {shown(args)}")
    try:
        numbers = [float(a) if not isinstance(a, bool) else math.nan for a in args]
    except (TypeError, ValueError):
        numbers = [math.nan]
    if any(not math.isfinite(n) for n in numbers):
        raise ValueError(f"{kind} arguments must be finite numbers, got {shown(args)}")
    _check_numbers(kind, numbers)
    return kind, numbers


def _check_numbers(kind: str, numbers: list[float]) -> None:
    if kind == "normal":
        if numbers[1] <= 0:
            raise ValueError(f"normal needs sigma > 0, got {numbers[1]:g}")
        return
    low, high = numbers[0], numbers[1]
    if low >= high:
        raise ValueError(f"{kind} needs low < high, got low={low:g} high={high:g}")
    if "log" in kind and low <= 0:
        raise ValueError(f"{kind} needs low > 0, got {low:g}")
    if kind.startswith("q") and numbers[2] <= 0:
        raise ValueError(f"{kind} needs q > 0, got {numbers[2]:g}")
    if kind == "randint" and not (low.is_integer() and high.is_integer()):
        raise ValueError(f"randint needs integer bounds, got {low:g}, {high:g}")


def probe_values(kind: str, args: list[Any]) -> list[Any]:
    """Values a primitive can produce at its edges, to validate against the target key."""
    if kind == "choice":
        return list(args)
    if kind == "randint":
        return [int(args[0]), int(args[1]) - 1]
    if kind == "normal":
        return [args[0]]
    if kind.startswith("q"):
        q = args[2]
        return [round(args[0] / q) * q, round(args[1] / q) * q]
    return [args[0], args[1]]


def grid_points(space: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every distinct configuration of a finite space, in the order the YAML lists the values."""
    import itertools

    keys = list(space)
    options = [_finite_values(key, space[key]) for key in keys]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*options)]


def _finite_values(key: str, spec: Any) -> list[Any]:
    kind, args = parse_entry(key, spec)
    if kind == "choice":
        return list({repr(option): option for option in args}.values())
    if kind == "randint":
        return list(range(int(args[0]), int(args[1])))
    if kind in ("quniform", "qloguniform"):
        q = args[2]
        return [_plain(k * q) for k in range(round(args[0] / q), round(args[1] / q) + 1)]
    raise ValueError(f"{key}: {kind} has infinitely many values")


def space_size(space: dict[str, dict[str, Any]]) -> int | None:
    """How many distinct configurations the space holds; None when a key is continuous."""
    size = 1
    for key, spec in space.items():
        kind, _ = parse_entry(key, spec)
        if kind not in ("choice", "randint", "quniform", "qloguniform"):
            return None
        size *= len(_finite_values(key, spec))
    return size


def planned_points(space: dict[str, dict[str, Any]], algo: str, max_evals: int) -> int:
    """How many distinct configurations a search trains (each `repeats` times)."""
    if not space:
        return 1
    if algo == "grid":
        return len(grid_points(space))
    size = space_size(space)
    return max_evals if size is None else min(size, max_evals)


def config_key(values: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """A sampled point as a hashable key: equal keys are the same configuration."""
    return tuple(sorted((key, repr(_plain(value))) for key, value in values.items()))


def plain_values(values: dict[str, Any]) -> dict[str, Any]:
    """A sampled point as plain Python values (numpy scalars unwrapped, 128.0 -> 128)."""
    return {key: _plain(value) for key, value in values.items()}


def _plain(value: Any) -> Any:
    """numpy scalars -> Python scalars, so values log and compare cleanly."""
    if hasattr(value, "item") and not isinstance(value, list | dict):
        value = value.item()
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)  # quniform's 128.0 is the filter count 128
    return value


def describe(space: dict[str, dict[str, Any]]) -> list[str]:
    """Readable lines, one per searched key, for `fmnist validate`."""
    lines = []
    for key, spec in space.items():
        kind, args = parse_entry(key, spec)
        lines.append(f"{key}: {kind}({', '.join(f'{a:g}' if isinstance(a, float) else repr(a) for a in args)})")
    return lines


