"""The study's report from a fixture store whose every verdict is known in advance."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from fmnist_hpo.cli.app import app
from fmnist_hpo.tags import CURRENT_RECORD_VERSION, RECORD_VERSION
from fmnist_hpo.tracking.writer import Tracker

runner = CliRunner()


def log_sweep(uri: str, experiment: str, runs: list[dict], algo: str = "tpe") -> None:
    """runs: dicts of test accuracy `test`, optional `values`, `point`, `repeat`, `seconds`, `params` (model size)."""
    tracker = Tracker(uri, experiment)
    parent = tracker.start_run("sweep", params={"description": f"{experiment} sweep"}, tags={"fmnist.role": "sweep"})
    for number, run in enumerate(runs):
        child = tracker.start_run(
            f"trial-{number:03d}", params={"search.algo": algo, "search.metric": "val_accuracy"},
            tags={"fmnist.role": "trial", "trial": str(number), "point": str(run.get("point", number)),
                  "repeat": str(run.get("repeat", 0)), "sampled": yaml.safe_dump(run.get("values", {})),
                  RECORD_VERSION: CURRENT_RECORD_VERSION},
            parent_id=parent)
        test = run["test"]
        tracker.log_metrics(child, {"val_accuracy": test + 0.005, "val_loss": 0.3}, step=0)
        tracker.log_metrics(child, {"test_accuracy": test, "kept_val_accuracy": test + 0.005, "kept_val_loss": 0.3,
                                    "kept_train_accuracy": test + 0.02, "kept_epoch": 1, "epochs_run": 1,
                                    "trial_seconds": run.get("seconds", 10.0),
                                    "total_parameters": run.get("params", 500_000)})
        tracker.end_run(child)
    tracker.end_run(parent)


def repeats(tests: list[float], **extra) -> list[dict]:
    """One configuration run with several seeds: a design that supports a test."""
    return [{"test": t, "point": 0, "repeat": i, **extra} for i, t in enumerate(tests)]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("study")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    log_sweep(uri, "exp01", repeats([0.900, 0.910, 0.905, 0.908]))
    log_sweep(uri, "exp02", repeats([0.850, 0.860, 0.855, 0.852]))
    log_sweep(uri, "exp03", repeats([0.895, 0.905, 0.900, 0.910]))
    log_sweep(uri, "exp04", [{"test": t, "values": {"train.lr": lr}, "params": 2_000_000}
                             for t, lr in [(0.91, 1e-3), (0.92, 2e-3), (0.90, 3e-3)]])
    log_sweep(uri, "exp07", repeats([0.930, 0.931, 0.932], seconds=100.0))
    log_sweep(uri, "exp08", repeats([0.940, 0.941, 0.942], seconds=200.0))
    log_sweep(uri, "exp11", repeats([0.920, 0.921, 0.922]))
    log_sweep(uri, "exp12", repeats([0.935, 0.936, 0.937]))
    log_sweep(uri, "exp13", [{"test": t, "values": {"model.dropout_placement": p}, "point": i // 2, "repeat": i % 2}
                             for i, (p, t) in enumerate([("all", 0.93), ("all", 0.932), ("none", 0.92), ("none", 0.921)])],
              algo="grid")
    path = folder / "STUDY.md"
    result = runner.invoke(app, ["analyze", "--all", "--tracking-uri", uri, "--report", str(path),
                                 "--plots", str(folder / "plots"), "--format", "json"])
    assert result.exit_code == 0, result.stderr
    return path.read_text()


def verdict_of(report: str, claim: str) -> str:
    line = next(line for line in report.splitlines() if line.startswith(f"| {claim} |"))
    return line.rsplit("|", 2)[-2].strip()


@pytest.mark.parametrize(("claim", "expected"), [
    ("BatchNorm is essential", "**held**"),
    ("heavy dropout hurts", "**not significant (n = 4 vs 4)**"),
    ("minimal dropout (0.05-0.15) is the sweet spot", "**exploratory (n = 3 vs 4): agrees in direction**"),
    ("4 blocks beat 3 at 5 epochs", "**not run (exp05 and exp04 need finished runs)**"),
    ("512 filters are not better than 256", "**not held**"),
    ("512 filters are slower than 256", "**held**"),
    ("100 epochs with early stopping is overkill against 40", "**held**"),
    ("residual connections add variance", "**not run (exp09 and exp07 need finished runs)**"),
    ("exp12 is the best configuration", "**not held**"),  # exp08 is first on validation here
])
def test_each_claim_gets_the_known_verdict(report: str, claim: str, expected: str):
    assert verdict_of(report, claim) == expected


def test_the_report_has_the_study_shape(report: str):
    assert "### Round 1 (5 epochs)" in report and "### Round 2 (long training)" in report
    round1 = report[report.index("### Round 1"):report.index("### Round 2")]
    assert "| exp01 | 89.57% | - | 90.58% |" in round1  # study's figure beside our selected test (mean of repeats)
    assert "### exp13: dropout placement (selected on validation: all)" in report
    assert "| all | 2 | 93.60% | 93.10% ± 0.14 points |" in report
    assert "300K-800K parameters is the efficient range" in report and "exploratory" in report
    assert "## Each experiment" in report
    exp01 = report[report.index("## exp01"):report.index("## exp02")]
    assert "![exp01_learning_curves](plots/exp01_learning_curves.png)" in exp01  # each plot beside its tables
