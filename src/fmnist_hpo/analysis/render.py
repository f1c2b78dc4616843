"""Sections of numbers -> a terminal table, markdown, CSV or JSON (the same numbers in each).

Human formats (table, markdown) show one header style, a mean and its std in one cell and a 95% CI
as `low–high`; terminal tables are split into several, each repeating the first column, to fit
TABLE_WIDTH. Machine formats (CSV, JSON) keep the raw column names, write a CI as two columns
(`X_ci95_low`, `X_ci95_high`) and counts as integers; CSV is one tidy table with a `section` column.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any

FORMATS = ("table", "markdown", "csv", "json")
TABLE_WIDTH = 100
WRAPPED_TEXT_WIDTH = 40  # a long text cell (a verdict) wraps to this width instead of widening its table

HEADERS = {
    "selected_runs": "selected runs",
    "selected_val_accuracy": "selected val acc",
    "selected_test_accuracy": "selected test acc",
    "val_mean": "val acc mean",
    "test_mean": "test acc mean",
    "val_ci95": "val acc 95% CI",
    "test_ci95": "test acc 95% CI",
    "median_parameters": "median params",
    "median_trial_seconds": "median trial s",
    "median_epochs": "median epochs",
    "mean_gap": "train−test gap",
    "kept_val_accuracy": "val acc",
    "test_accuracy": "test acc",
    "epochs_run": "epochs",
    "total_parameters": "params",
    "difference_ci95": "difference 95% CI",
    "p_value": "p",
    "r_squared": "R²",
    "cut_off": "cut off",
}
TARGET_COLUMN = re.compile(r"^to_(\d+)(?:_(\d+))?_(seconds|epochs)$")  # time to a validation accuracy (costs.py)
COUNT_NAMES = ("finished", "pruned", "failed", "cut_off", "n", "n_a", "n_b", "trial", "repeat")
POINTS_COLUMNS = ("mean_gap", "difference", "difference_ci95", "slope")  # differences of accuracies: percentage points
COEFFICIENTS = ("rho", "r_squared")  # statistics in [-1, 1], shown as they are, never as percentages
COUNT_SUFFIXES = ("_runs", "epochs", "epochs_run", "parameters")


@dataclass
class Section:
    """A titled table of raw values: what analyze computes and every format shows."""

    title: str
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)


def is_count(column: str) -> bool:
    return column in COUNT_NAMES or column.endswith(COUNT_SUFFIXES)


def is_config_key(column: str) -> bool:
    return "." in column


def header(column: str) -> str:
    if is_config_key(column):
        return column
    target = TARGET_COLUMN.match(column)
    if target:
        percent = target[1] + (f".{target[2]}" if target[2] else "")
        return f"{'s' if target[3] == 'seconds' else 'epochs'} to {percent}%"
    return HEADERS.get(column, column.replace("_", " "))


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def format_value(column: str, value: Any, percent: bool = False) -> str:
    """One cell for people: counts as integers, seconds to 0.1 s, config values (learning rates too) to
    4 significant digits like the value groups and the run's own table, p-values to 3, accuracies and
    their differences to 4 decimals (percent: as percentages, or percentage points, to 2 decimals)."""
    if value is None or _is_nan(value):
        return "-"
    if isinstance(value, list):
        if all(v is None or _is_nan(v) for v in value):
            return "-"
        if column.endswith("_ci95") and len(value) == 2:
            return "–".join(format_value(column.removesuffix("_ci95"), v, percent) for v in value)
        return "[" + ", ".join(format_value(column, v, percent) for v in value) + "]"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if percent and is_fraction(column):
        return f"{value * 100:.2f}"
    return _format_number(column, value)


def is_fraction(column: str) -> bool:
    """Whether a numeric column holds an accuracy (or a difference or spread of accuracies)."""
    return not (is_count(column) or is_config_key(column) or column.endswith("_seconds") or column == "p_value"
                or column in COEFFICIENTS)


def unit_of(column: str) -> str:
    return "points" if column in POINTS_COLUMNS or column.endswith("_std") else "%"


def _format_number(column: str, value: float) -> str:
    if is_count(column):
        return str(int(value)) if float(value).is_integer() else f"{value:.1f}"
    if column.endswith("_seconds"):
        return f"{value:.1f}"
    if column == "p_value":
        return f"{value:.3g}"
    if column in COEFFICIENTS:
        return f"{value:.2f}"
    if is_config_key(column):
        return str(value) if isinstance(value, int) else f"{value:.4g}"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}"


def std_partner(column: str, columns: list[str]) -> str | None:
    """The column holding column's standard deviation: X_mean -> X_std, selected_test_accuracy -> selected_test_std."""
    for suffix in ("_mean", "_accuracy"):
        if column.endswith(suffix) and f"{column.removesuffix(suffix)}_std" in columns:
            return f"{column.removesuffix(suffix)}_std"
    return None


def display_columns(section: Section, percent: bool = False) -> list[tuple[str, list[str]]]:
    """(header, source columns) for human formats: a value and its std become one 'X ± std' column;
    with percent, an accuracy column's header carries its unit (% or points)."""
    partners = {std_partner(c, section.columns) for c in section.columns} - {None}
    shown = []
    for column in section.columns:
        if column in partners:
            continue
        partner = std_partner(column, section.columns)
        name = f"{header(column)} ± std" if partner else header(column)
        if percent and is_fraction(column) and _is_numeric(section, column):
            name += f" ({unit_of(column)})"
        shown.append((name, [column, partner] if partner else [column]))
    return shown


def display_cells(section: Section, row: dict[str, Any], percent: bool = False) -> list[str]:
    cells = []
    for _, sources in display_columns(section):
        values = [format_value(c, row.get(c), percent) for c in sources]
        cells.append(values[0] if len(values) == 1 or values[1] == "-" else f"{values[0]} ± {values[1]}")
    return cells


def to_markdown(sections: list[Section], level: int = 3, percent: bool = False) -> str:
    """Markdown tables under headings of the given level; percent shows accuracies as percentages."""
    out = []
    for section in sections:
        headers = [name for name, _ in display_columns(section, percent)]
        out.append(f"{'#' * level} {section.title}\n")
        out.append("| " + " | ".join(headers) + " |")
        out.append("|" + "---|" * len(headers))
        for row in section.rows:
            cells = display_cells(section, row, percent)
            out.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        out.append("")
    return "\n".join(out)


# --- machine formats: tidy columns ------------------------------------------------------------------


def tidy_columns(section: Section) -> list[str]:
    """The section's columns with each 95% CI split into its low and high end."""
    columns = []
    for column in section.columns:
        columns += [f"{column}_low", f"{column}_high"] if column.endswith("_ci95") else [column]
    return columns


def tidy_row(section: Section, row: dict[str, Any]) -> dict[str, Any]:
    """A row for CSV and JSON: CIs as two values, integral counts as integers, missing numbers as None."""
    tidy: dict[str, Any] = {}
    for column in section.columns:
        value = row.get(column)
        if column.endswith("_ci95"):
            low, high = value if isinstance(value, list) and len(value) == 2 else (None, None)
            tidy[f"{column}_low"], tidy[f"{column}_high"] = _tidy_value(column, low), _tidy_value(column, high)
        else:
            tidy[column] = _tidy_value(column, value)
    return tidy


def _tidy_value(column: str, value: Any) -> Any:
    if value is None or _is_nan(value):
        return None
    if isinstance(value, list):
        return [_tidy_value(column, v) for v in value]
    if is_count(column) and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def to_csv(sections: list[Section]) -> str:
    """One tidy table: a row per table row, a `section` column naming its table, and the union of every
    section's columns (empty where a section has no such column), so `pandas.read_csv` loads it at once."""
    columns = ["section", *dict.fromkeys(c for s in sections for c in tidy_columns(s))]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    for section in sections:
        for row in section.rows:
            tidy = {c: _csv_cell(v) for c, v in tidy_row(section, row).items()}
            writer.writerow({"section": section.title, **tidy})
    return buffer.getvalue()


def _csv_cell(value: Any) -> Any:
    if isinstance(value, list):
        return json.dumps(value)
    return "" if value is None else value


def to_json(sections: list[Section]) -> str:
    payload = {"sections": [{"title": s.title, "columns": tidy_columns(s), "rows": [tidy_row(s, r) for r in s.rows]}
                            for s in sections]}
    return json.dumps(payload, indent=2, default=str)


# --- terminal tables ----------------------------------------------------------------------------------


def fitted_parts(section: Section, width: int) -> list[list[int]]:
    """Indices of display columns per table, each table repeating column 0 and fitting width characters."""
    columns = display_columns(section)
    cells = [display_cells(section, row) for row in section.rows]
    widths = [_column_width(name, [row[i] for row in cells]) for i, (name, _) in enumerate(columns)]
    parts: list[list[int]] = [[0]]
    for i in range(1, len(columns)):
        used = 1 + sum(widths[j] + 3 for j in parts[-1])
        if used + widths[i] + 3 > width and len(parts[-1]) > 1:
            parts.append([0])
        parts[-1].append(i)
    return parts


def _column_width(name: str, cells: list[str]) -> int:
    longest_cell = max((len(c) for c in cells), default=0)
    return max(len(name), min(longest_cell, WRAPPED_TEXT_WIDTH) if longest_cell > WRAPPED_TEXT_WIDTH else longest_cell)


def _is_numeric(section: Section, column: str) -> bool:
    values = [row.get(column) for row in section.rows]
    return all(v is None or (isinstance(v, int | float | list) and not isinstance(v, bool)) for v in values)


def print_tables(sections: list[Section]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else TABLE_WIDTH)
    width = min(TABLE_WIDTH, console.width)
    for section in sections:
        columns = display_columns(section)
        cells = [display_cells(section, row) for row in section.rows]
        parts = fitted_parts(section, width)
        for n, part in enumerate(parts, start=1):
            title = section.title if len(parts) == 1 else f"{section.title} ({n} of {len(parts)})"
            table = Table(title=title, title_justify="left", width=None)
            for i in part:
                wraps = max((len(row[i]) for row in cells), default=0) > WRAPPED_TEXT_WIDTH
                table.add_column(columns[i][0], no_wrap=not wraps, overflow="fold",
                                 max_width=WRAPPED_TEXT_WIDTH if wraps else None,
                                 justify="right" if _is_numeric(section, columns[i][1][0]) else "left")
            for row in cells:
                table.add_row(*(row[i] for i in part))
            console.print(table, width=width)


def render(sections: list[Section], fmt: str) -> str | None:
    """The text of sections in fmt; None for `table`, which is printed directly."""
    if fmt == "table":
        print_tables(sections)
        return None
    return {"markdown": to_markdown, "csv": to_csv, "json": to_json}[fmt](sections)
