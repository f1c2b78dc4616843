"""`fmnist analyze` against a store whose metric values the test chose, checked by hand-computed numbers."""

import csv
import io
import itertools
import json
import math
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats as scipy_stats
from typer.testing import CliRunner

from fmnist_hpo.analysis.stats import compare, summarize
from fmnist_hpo.cli.app import app
from fmnist_hpo.tags import CURRENT_RECORD_VERSION, RECORD_VERSION
from fmnist_hpo.tracking.writer import Tracker

runner = CliRunner()
# alpha and delta: one configuration run with several seeds (repeats); beta: a TPE sweep over filters.
# Validation and test rankings disagree on purpose: whatever ranks on test instead of validation fails.
ALPHA_TEST, ALPHA_VAL = [0.90, 0.91, 0.92], [0.93, 0.925, 0.915]
BETA_TEST, BETA_VAL = [0.85, 0.86, 0.88, 0.87], [0.90, 0.86, 0.87, 0.88]
DELTA_TEST = [0.85, 0.86, 0.88, 0.87]


def log_trial(tracker: Tracker, parent: str, number: int, values: dict, test: float, val: float, status="FINISHED",
              point: int | None = None, repeat: int = 0, algo: str = "tpe"):
    import yaml

    point = number if point is None else point
    run = tracker.start_run(f"trial-{number:03d}", params={"train.epochs": 3, "search.algo": algo},
                            tags={"fmnist.role": "trial", "trial": str(number), "point": str(point),
                                  "repeat": str(repeat), "sampled": yaml.safe_dump(values),
                                  RECORD_VERSION: CURRENT_RECORD_VERSION},
                            parent_id=parent)
    if status == "FINISHED":
        for epoch in range(3):
            tracker.log_metrics(run, {"val_loss": 1.0 / (epoch + 1) + number, "val_accuracy": val - 0.01 * (2 - epoch)},
                                step=epoch)
        tracker.log_metrics(run, {"test_accuracy": test, "kept_val_accuracy": val, "kept_val_loss": 1.0 - val,
                                  "kept_train_accuracy": test + 0.05, "kept_epoch": 3,
                                  "total_parameters": 1000 * (number + 1), "trial_seconds": 10.0 + number,
                                  "epochs_run": 3})
    tracker.end_run(run, status)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    tracker = Tracker(uri, "alpha")
    parent = tracker.start_run("sweep", params={"description": "alpha sweep"}, tags={"fmnist.role": "sweep"})
    for i, (test, val) in enumerate(zip(ALPHA_TEST, ALPHA_VAL, strict=True)):
        log_trial(tracker, parent, i, {}, test, val, point=0, repeat=i)
    tracker.end_run(parent)
    tracker = Tracker(uri, "beta")
    parent = tracker.start_run("sweep", params={"description": "beta sweep"}, tags={"fmnist.role": "sweep"})
    for i, (test, val, f) in enumerate(zip(BETA_TEST, BETA_VAL, [32, 32, 64, 64], strict=True)):
        log_trial(tracker, parent, i, {"model.filters": f}, test, val)
    log_trial(tracker, parent, len(BETA_TEST), {"model.filters": 64}, 0.0, 0.0, status="FAILED")
    tracker.end_run(parent)
    tracker = Tracker(uri, "delta")
    parent = tracker.start_run("sweep", params={"description": "delta sweep"}, tags={"fmnist.role": "sweep"})
    for i, test in enumerate(DELTA_TEST):
        log_trial(tracker, parent, i, {}, test, test + 0.005, point=0, repeat=i)
    tracker.end_run(parent)
    Tracker(uri, "empty").start_run("sweep", params={}, tags={"fmnist.role": "trial"})
    return uri


def analyze(store: str, *args: str):
    return runner.invoke(app, ["analyze", "--tracking-uri", store, *args])


def sections_of(result) -> dict:
    assert result.exit_code == 0, result.stderr
    return {s["title"]: s for s in json.loads(result.stdout)["sections"]}


def test_summary_numbers_match_hand_computation(store: str):
    summary = sections_of(analyze(store, "-e", "alpha", "-e", "beta", "--format", "json"))["Summary"]["rows"]
    alpha, beta = summary
    n = len(ALPHA_TEST)
    mean = sum(ALPHA_TEST) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in ALPHA_TEST) / (n - 1))
    half = 4.302652729911275 * std / math.sqrt(n)  # Student's t, 97.5% quantile, 2 degrees of freedom
    assert alpha["finished"] == 3 and alpha["failed"] == 0
    assert alpha["test_mean"] == pytest.approx(mean, abs=1e-6)
    assert alpha["test_std"] == pytest.approx(std, abs=1e-6)
    assert [alpha["test_ci95_low"], alpha["test_ci95_high"]] == pytest.approx([mean - half, mean + half], abs=1e-6)
    # one configuration: the selection is all three repeats, and its figures are their means
    assert alpha["selected_runs"] == 3
    assert alpha["selected_test_accuracy"] == pytest.approx(mean) and alpha["selected_test_std"] == pytest.approx(std)
    assert alpha["selected_val_accuracy"] == pytest.approx(sum(ALPHA_VAL) / 3)
    assert alpha["mean_gap"] == pytest.approx(0.05, abs=1e-6)
    assert alpha["median_parameters"] == 2000
    assert beta["finished"] == 4 and beta["failed"] == 1
    # beta's best validation trial (0) has the worst test accuracy: selection must not look at test
    assert beta["selected_runs"] == 1 and beta["selected_test_accuracy"] == pytest.approx(0.85)
    assert beta["selected_val_accuracy"] == pytest.approx(0.90)


def test_top_trials_are_ranked_on_validation_not_test(store: str):
    section = sections_of(analyze(store, "-e", "beta", "--format", "json"))["beta: top trials by validation (val_accuracy)"]
    assert [r["trial"] for r in section["rows"]] == [0, 3, 2, 1]
    assert "repeat" not in section["columns"]
    alpha = sections_of(analyze(store, "-e", "alpha", "--format", "json"))["alpha: top trials by validation (val_accuracy)"]
    assert [r["repeat"] for r in alpha["rows"]] == [0, 1, 2]


def test_per_parameter_groups(store: str):
    section = sections_of(analyze(store, "-e", "beta", "--format", "json"))
    rows = section["beta: accuracy by value of each searched parameter"]["rows"]
    by_value = {r["value"]: r for r in rows}
    assert by_value["32"]["n"] == 2 and by_value["32"]["test_mean"] == pytest.approx(0.855, abs=1e-6)
    assert by_value["64"]["test_std"] == pytest.approx(np.std([0.88, 0.87], ddof=1), abs=1e-6)


def test_compare_is_welch_t_test(store: str):
    result = sections_of(analyze(store, "--compare", "alpha", "delta", "--format", "json"))
    row = result["alpha vs delta (test_accuracy)"]["rows"][0]
    a, b = np.array(ALPHA_TEST), np.array(DELTA_TEST)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    p = 2 * scipy_stats.t.sf(abs(t), df)
    half = scipy_stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert row["difference"] == pytest.approx(a.mean() - b.mean(), abs=1e-6)
    assert row["p_value"] == pytest.approx(p, abs=1e-6)
    assert [row["difference_ci95_low"], row["difference_ci95_high"]] == pytest.approx(
        [a.mean() - b.mean() - half, a.mean() - b.mean() + half], abs=1e-6)
    assert "alpha beats delta" in row["verdict"] and "preliminary" in row["verdict"] and "n = 3 vs 4" in row["verdict"]


def test_groups_a_search_sampled_are_exploratory(store: str):
    result = sections_of(analyze(store, "--compare", "alpha", "beta", "--format", "json"))
    row = result["alpha vs beta (test_accuracy)"]["rows"][0]
    assert row["p_value"] < 0.05  # the numbers are still shown ...
    assert row["verdict"].startswith("exploratory (n = 3 vs 4)") and "beats" not in row["verdict"]  # ... no claim


def test_a_missing_value_is_left_out_of_the_test_too():
    with_nan = compare([0.90, math.nan, 0.91, 0.92], [0.85, 0.86, 0.88, 0.87])
    clean = compare([0.90, 0.91, 0.92], [0.85, 0.86, 0.88, 0.87])
    assert with_nan.p_value == pytest.approx(clean.p_value) and math.isfinite(with_nan.p_value)
    assert with_nan.ci_low > 0 and "beats" in with_nan.verdict


def test_compare_groups_within_one_experiment(store: str):
    result = sections_of(analyze(store, "--compare", "beta:model.filters=64", "beta:model.filters=32", "--format", "json"))
    row = result["beta:model.filters=64 vs beta:model.filters=32 (test_accuracy)"]["rows"][0]
    assert (row["n_a"], row["n_b"]) == (2, 2)
    assert row["mean_a"] == pytest.approx(0.875) and row["mean_b"] == pytest.approx(0.855)
    assert row["verdict"].startswith("exploratory")  # TPE's samples differ in more than this key


def test_verdicts_do_not_overclaim():
    assert compare([0.9], [0.8, 0.85]).verdict.startswith("cannot test")
    same = compare([0.90, 0.91, 0.92], [0.905, 0.915, 0.91])
    assert same.verdict.startswith("no significant difference") and "could be missed" in same.verdict
    assert summarize([0.5]).std != summarize([0.5]).std  # nan: no spread from one run


def test_formats_have_their_structure(store: str):
    markdown = analyze(store, "-e", "alpha", "--format", "markdown").stdout
    assert "### Summary" in markdown and "| experiment |" in markdown and "|---|" in markdown
    assert "test acc mean ± std" in markdown and "_" not in markdown.split("\n")[2]  # one header style
    table = analyze(store, "-e", "alpha")
    assert table.exit_code == 0 and "alpha" in table.stdout and "0.9100 ± 0.0100" in table.stdout


def test_csv_is_one_tidy_table(store: str):
    import pandas

    text = analyze(store, "-e", "alpha", "-e", "beta", "--format", "csv").stdout
    frame = pandas.read_csv(io.StringIO(text))
    assert frame.columns[0] == "section" and not any(line.startswith("#") for line in text.splitlines())
    summary = frame[frame["section"] == "Summary"].set_index("experiment")
    assert summary.loc["alpha", "test_mean"] == pytest.approx(0.91)
    assert summary.loc["alpha", "test_ci95_low"] < 0.91 < summary.loc["alpha", "test_ci95_high"]
    rows = list(csv.DictReader(io.StringIO(text)))
    assert {r["finished"] for r in rows if r["section"] == "Summary"} == {"3", "4"}  # counts as integers
    assert {r["median_parameters"] for r in rows if r["section"] == "Summary"} <= {"2000", "3000", "2500"}
    assert "repeat" not in [c for c in frame.columns if frame[frame["section"].str.startswith("beta")][c].notna().any()]


def test_json_counts_are_integers_and_cis_two_numbers(store: str):
    sections = sections_of(analyze(store, "-e", "beta", "--format", "json"))
    top = sections["beta: top trials by validation (val_accuracy)"]
    assert all(isinstance(r["epochs_run"], int) and isinstance(r["total_parameters"], int) for r in top["rows"])
    summary = sections["Summary"]
    assert "test_ci95" not in summary["columns"] and {"test_ci95_low", "test_ci95_high"} <= set(summary["columns"])


def test_terminal_tables_fit_100_columns(store: str):
    result = analyze(store, "--all", "--compare", "alpha", "delta")
    assert result.exit_code == 0, result.stderr
    assert max(len(line) for line in result.stdout.splitlines()) <= 100
    assert "Summary (1 of" in result.stdout and "0.9100 ± 0.0100" in result.stdout


def test_plots_are_real_pngs(store: str, tmp_path: Path):
    result = analyze(store, "-e", "beta", "--plots", str(tmp_path / "plots"))
    assert result.exit_code == 0, result.stderr
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["beta_by_model.filters.png", "beta_learning_curves.png",
                     "beta_optimisation_history.png", "beta_pareto.png"]
    for path in (tmp_path / "plots").iterdir():
        image = Image.open(path)
        assert image.format == "PNG"
        assert len(set(image.convert("RGB").getdata())) > 1


def test_report_is_written(store: str, tmp_path: Path):
    result = analyze(store, "--all", "--report", str(tmp_path / "findings.md"), "--format", "json")
    assert result.exit_code == 0, result.stderr
    text = (tmp_path / "findings.md").read_text()
    assert "## alpha" in text and "## beta" in text and "## Conclusions" in text
    assert "alpha sweep" in text
    # ranked on validation: alpha (92.33%), beta (90.00%, though its selected test is the lowest), delta
    assert "1. alpha: validation 92.33%, test 91.00% (selected configuration, 3 runs)" in text
    assert "2. beta: validation 90.00%, test 85.00%" in text and "3. delta:" in text
    assert "alpha against beta (the top two on validation)" in text and "exploratory" in text


def test_report_has_units_even_headings_and_the_plots_file_mode(store: str, tmp_path: Path):
    report = tmp_path / "findings.md"
    result = analyze(store, "-e", "beta", "--report", str(report), "--plots", str(tmp_path / "plots"))
    assert result.exit_code == 0, result.stderr
    text = report.read_text()
    levels = [len(line) - len(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")]
    assert levels[0] == 1 and all(b - a <= 1 for a, b in itertools.pairwise(levels))
    assert "| val acc (%) | test acc (%) |" in text and "| 90.00 | 85.00 |" in text
    assert "Round" not in text and "gap (train accuracy at the kept epoch minus test accuracy) +5.00 points" in text
    png = next((tmp_path / "plots").iterdir())
    assert stat.S_IMODE(report.stat().st_mode) == stat.S_IMODE(png.stat().st_mode)
    for plot in (tmp_path / "plots").iterdir():  # the report stands alone: every plot it was written with
        assert f"](plots/{plot.name})" in text
    assert "from 5 trial runs (4 finished, 0 pruned, 1 failed, 0 cut off)" in text  # as the tables count them


def test_unknown_experiment_lists_the_known_ones(store: str):
    result = analyze(store, "-e", "gamma")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "unknown experiment 'gamma'; known experiments: alpha, beta, delta, empty" in result.stderr


def test_no_finished_runs_says_so(store: str):
    result = analyze(store, "-e", "empty")
    assert result.exit_code == 2 and "no finished runs" in result.stderr


def test_missing_store_is_a_clear_error(tmp_path: Path):
    result = runner.invoke(app, ["analyze", "--all", "--tracking-uri", f"sqlite:///{tmp_path}/none.db"])
    assert result.exit_code == 2 and "no MLflow store here yet" in result.stderr
