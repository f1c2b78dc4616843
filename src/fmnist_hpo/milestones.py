"""Time to accuracy: how long a trial took to first reach given validation accuracies.

A trial logs, for each target in `mlflow.time_to_accuracy`, the seconds (its epochs' wall time,
training and validation, summed up to and including the epoch that reached it) and the epochs it
took; a target never reached is not logged. analyze reads the targets back from the metric names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from fmnist_hpo.records import EpochMetrics

_SECONDS = "seconds_to_val_acc_"
_EPOCHS = "epochs_to_val_acc_"
_NAME = re.compile(rf"^{_SECONDS}(\d+(?:_\d+)?)$")


def _suffix(target: float) -> str:
    """0.9 -> '90', 0.925 -> '92_5': percent, with no dot (a dot reads as a config key elsewhere)."""
    return f"{target * 100:.6g}".replace(".", "_")


def seconds_key(target: float) -> str:
    return _SECONDS + _suffix(target)


def epochs_key(target: float) -> str:
    return _EPOCHS + _suffix(target)


def reached(history: list[EpochMetrics], targets: Iterable[float]) -> dict[str, float]:
    """{seconds_to_val_acc_NN: s, epochs_to_val_acc_NN: n} for each target some epoch of history reached."""
    found: dict[str, float] = {}
    epochs = sorted(history, key=lambda m: m.epoch)
    for target in targets:
        elapsed = 0.0
        for count, m in enumerate(epochs, start=1):
            elapsed += m.epoch_seconds
            if m.val_accuracy >= target:
                found[seconds_key(target)], found[epochs_key(target)] = elapsed, float(count)
                break
    return found


def targets_in(metrics: Iterable[Mapping[str, float]]) -> list[float]:
    """The targets some trial logged, ascending."""
    found = set()
    for names in metrics:
        for name in names:
            match = _NAME.match(name)
            if match:
                found.add(float(match.group(1).replace("_", ".")) / 100)
    return sorted(found)
