"""Sections of numbers -> a terminal table, markdown, CSV or JSON (the same numbers in each)."""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any

FORMATS = ("table", "markdown", "csv", "json")


@dataclass
class Section:
    """A titled table of raw values: what analyze computes and every format shows."""

    title: str
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)


def format_value(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        if all(isinstance(v, float) and math.isnan(v) for v in value):
            return "-"
        return "[" + ", ".join(format_value(column, v) for v in value) + "]"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if math.isnan(value):
        return "-"
    if column == "p_value":
        return f"{value:.3g}"
    if isinstance(value, int) or (value.is_integer() and abs(value) >= 1):
        return f"{int(value)}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.4f}"


def display_columns(section: Section) -> list[tuple[str, list[str]]]:
    """(header, source columns) for human formats: X_mean and X_std become one 'X mean ± std' column."""
    shown = []
    for column in section.columns:
        prefix = column.removesuffix("_mean")
        if column.endswith("_std") and f"{column.removesuffix('_std')}_mean" in section.columns:
            continue
        if column.endswith("_mean") and f"{prefix}_std" in section.columns:
            shown.append((f"{prefix} mean ± std", [column, f"{prefix}_std"]))
        else:
            shown.append((column, [column]))
    return shown


def display_cells(section: Section, row: dict[str, Any]) -> list[str]:
    cells = []
    for _, sources in display_columns(section):
        values = [format_value(c, row.get(c)) for c in sources]
        cells.append(values[0] if len(values) == 1 or values[1] == "-" else f"{values[0]} ± {values[1]}")
    return cells


def to_markdown(sections: list[Section]) -> str:
    out = []
    for section in sections:
        headers = [header for header, _ in display_columns(section)]
        out.append(f"### {section.title}\n")
        out.append("| " + " | ".join(headers) + " |")
        out.append("|" + "---|" * len(headers))
        for row in section.rows:
            out.append("| " + " | ".join(cell.replace("|", "\\|") for cell in display_cells(section, row)) + " |")
        out.append("")
    return "\n".join(out)


def to_csv(sections: list[Section]) -> str:
    """One block per section: a `# title` line, a header row, the rows; blocks split by a blank line."""
    buffer = io.StringIO()
    for i, section in enumerate(sections):
        if i:
            buffer.write("\n")
        buffer.write(f"# {section.title}\n")
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(section.columns)
        for row in section.rows:
            writer.writerow([_csv_value(row.get(c)) for c in section.columns])
    return buffer.getvalue()


def _csv_value(value: Any) -> Any:
    if isinstance(value, list):
        return ";".join("" if _is_nan(v) else repr(v) for v in value)
    return "" if value is None or _is_nan(value) else value


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def to_json(sections: list[Section]) -> str:
    def clean(value: Any) -> Any:
        if isinstance(value, list):
            return [clean(v) for v in value]
        return None if _is_nan(value) else value

    payload = {"sections": [{"title": s.title, "columns": s.columns,
                             "rows": [{c: clean(r.get(c)) for c in s.columns} for r in s.rows]} for s in sections]}
    return json.dumps(payload, indent=2, default=str)


def print_tables(sections: list[Section]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 240)  # pipes and files get whole rows
    for section in sections:
        table = Table(title=section.title, title_justify="left")
        for header, _ in display_columns(section):
            table.add_column(header, overflow="fold")
        for row in section.rows:
            table.add_row(*display_cells(section, row))
        console.print(table)


def render(sections: list[Section], fmt: str) -> str | None:
    """The text of sections in fmt; None for `table`, which is printed directly."""
    if fmt == "table":
        print_tables(sections)
        return None
    return {"markdown": to_markdown, "csv": to_csv, "json": to_json}[fmt](sections)
