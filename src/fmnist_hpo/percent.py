"""How an accuracy reads in text: the one percentage format of the reports, the study and the CLI."""

from __future__ import annotations

import math


def percent(value: float | None) -> str:
    """0.9254 -> '92.54%'; a figure a run does not have (None, NaN) -> '-'."""
    return "-" if value is None or not math.isfinite(value) else f"{value * 100:.2f}%"
