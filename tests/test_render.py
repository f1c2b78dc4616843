"""render.py: one number format per kind of column, tidy machine formats, tables that fit."""

from __future__ import annotations

import json
import math

from fmnist_hpo.analysis.analyze import parameter_groups
from fmnist_hpo.analysis.render import Section, fitted_parts, format_value, to_csv, to_json, to_markdown
from fmnist_hpo.records import LoggedTrial


def test_each_kind_of_number_has_one_format():
    assert format_value("median_parameters", 2000.0) == "2000" and format_value("n", 3) == "3"
    assert format_value("median_epochs", 2.5) == "2.5"
    assert format_value("median_trial_seconds", 11.04) == "11.0" and format_value("median_trial_seconds", 123.45) == "123.5"
    assert format_value("test_mean", 0.91234) == "0.9123" and format_value("test_mean", math.nan) == "-"
    assert format_value("p_value", 0.0035612) == "0.00356"
    assert format_value("test_ci95", [0.88521, 0.93479]) == "0.8852–0.9348"
    assert format_value("test_mean", 0.91234, percent=True) == "91.23"


def test_a_learning_rate_reads_the_same_in_every_table():
    lrs = [1e-4, 2.2543e-4, 5.0123e-4, 1.1e-3, 4.5e-3]
    trials = [LoggedTrial(str(i), "e", i, i, 0, "FINISHED", {"train.lr": lr}, {"test_accuracy": 0.9}, {}, {})
              for i, lr in enumerate(lrs)]
    labels = " ".join(label for label, _ in parameter_groups(trials, "train.lr"))
    assert format_value("train.lr", 2.2543e-4) in labels and format_value("train.lr", 1e-4) in labels


def summary() -> Section:
    return Section("Summary", ["experiment", "finished", "test_mean", "test_std", "test_ci95", "median_parameters"],
                   [{"experiment": "a", "finished": 3, "test_mean": 0.91, "test_std": 0.01, "test_ci95": [0.88, 0.94],
                     "median_parameters": 2000.0},
                    {"experiment": "b", "finished": 1, "test_mean": 0.85, "test_std": math.nan,
                     "test_ci95": [math.nan, math.nan], "median_parameters": 2500.0}])


def test_machine_formats_split_the_ci_and_keep_counts_integral():
    rows = json.loads(to_json([summary()]))["sections"][0]["rows"]
    assert rows[0]["test_ci95_low"] == 0.88 and rows[0]["test_ci95_high"] == 0.94 and "test_ci95" not in rows[0]
    assert rows[0]["median_parameters"] == 2000 and isinstance(rows[0]["median_parameters"], int)
    assert rows[1]["test_std"] is None and rows[1]["test_ci95_low"] is None
    lines = to_csv([summary(), Section("other", ["trial"], [{"trial": 4}])]).splitlines()
    assert lines[0] == "section,experiment,finished,test_mean,test_std,test_ci95_low,test_ci95_high,median_parameters,trial"
    assert lines[1] == "Summary,a,3,0.91,0.01,0.88,0.94,2000," and lines[3] == "other,,,,,,,,4"


def test_markdown_pairs_mean_and_std_and_carries_units_in_percent():
    text = to_markdown([summary()], percent=True)
    assert "| experiment | finished | test acc mean ± std (%) | test acc 95% CI (%) | median params |" in text
    assert "| a | 3 | 91.00 ± 1.00 | 88.00–94.00 | 2000 |" in text


def test_wide_sections_are_split_into_parts_that_fit():
    columns = ["experiment", *(f"metric_{i}_accuracy" for i in range(12))]
    wide = Section("wide", columns, [{c: ("exp" if c == "experiment" else 0.5) for c in columns}])
    parts = fitted_parts(wide, 100)
    assert len(parts) > 1 and all(part[0] == 0 for part in parts)
    assert sorted({i for part in parts for i in part}) == list(range(len(columns)))
    widths = [len(header) for header in ["experiment", *(c.replace("_", " ") for c in columns[1:])]]
    assert all(1 + sum(widths[i] + 3 for i in part) <= 100 for part in parts)
