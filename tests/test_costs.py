"""What accuracy costs, trends of continuous keys, run counts and spec differences, on hand-made trials."""

from __future__ import annotations

import math

import pytest
from scipy import stats as scipy_stats

from fmnist_hpo.analysis.analyze import continuous_keys, discrete_keys, is_log_scaled, outcome_counts, trends
from fmnist_hpo.analysis.costs import configurations, front, pareto_section, time_to_accuracy_section
from fmnist_hpo.analysis.report import runs_line
from fmnist_hpo.analysis.spec_diff import spec_difference
from fmnist_hpo.analysis.stats import trend
from fmnist_hpo.milestones import reached, targets_in
from fmnist_hpo.records import EpochMetrics, LoggedTrial

SPACE = '{"train.lr": {"loguniform": [0.0001, 0.1]}, "model.filters": {"choice": [8, 16]}}'


def trial(number: int, val: float, params: float, seconds: float, point: int | None = None, repeat: int = 0,
          status: str = "FINISHED", tags: dict | None = None, extra: dict | None = None, **values) -> LoggedTrial:
    metrics = {"kept_val_accuracy": val, "test_accuracy": val - 0.01, "total_parameters": params,
               "trial_seconds": seconds, **(extra or {})}
    return LoggedTrial(f"r{number}-{repeat}", "e", number, number if point is None else point, repeat, status,
                       values, metrics, {"search.space": SPACE, "train.epochs": "3"},
                       {"device": "cpu", "torch_version": "2.14.1", **(tags or {})})


def test_the_front_keeps_only_what_nothing_beats_for_less():
    runs = [trial(0, 0.90, 1000, 10), trial(1, 0.88, 2000, 5), trial(2, 0.92, 3000, 30), trial(3, 0.91, 4000, 8)]
    configs = configurations("e", runs)
    by_params = [c.first.number for c in front(configs, lambda c: c.parameters)]
    by_seconds = [c.first.number for c in front(configs, lambda c: c.seconds)]
    assert by_params == [0, 2]  # 1 and 3 cost more parameters than 0 or 2 for less accuracy
    assert by_seconds == [1, 3, 2]  # 0 is slower than 3 and worse
    rows = pareto_section("e", {"e": runs}).rows
    assert {r["trial"]: r["front"] for r in rows} == {0: "parameters", 1: "seconds", 2: "parameters and seconds",
                                                      3: "seconds"}


def test_repeats_are_one_point_their_mean():
    runs = [trial(0, 0.90, 1000, 10, point=0), trial(1, 0.80, 1000, 20, point=0, repeat=1)]
    (config,) = configurations("e", runs)
    assert config.val_accuracy == pytest.approx(0.85) and config.seconds == pytest.approx(15)


def test_time_to_accuracy_counts_seconds_and_epochs_up_to_the_first_epoch_reaching_it():
    history = [EpochMetrics(e, 1.0, 0.5, 1.0, acc, 1e-3, 2.0 + e) for e, acc in enumerate([0.80, 0.87, 0.86, 0.91])]
    got = reached(history, [0.85, 0.90, 0.95])
    assert got == {"seconds_to_val_acc_85": 2.0 + 3.0, "epochs_to_val_acc_85": 2,
                   "seconds_to_val_acc_90": 2.0 + 3.0 + 4.0 + 5.0, "epochs_to_val_acc_90": 4}
    assert targets_in([got, {"seconds_to_val_acc_92_5": 1.0}]) == [0.85, 0.90, 0.925]


def test_time_to_accuracy_is_blank_unless_every_repeat_reached_it():
    runs = [trial(0, 0.9, 1, 1, point=0, extra={"seconds_to_val_acc_90": 4.0, "epochs_to_val_acc_90": 2}),
            trial(1, 0.9, 1, 1, point=0, repeat=1, extra={"seconds_to_val_acc_90": 6.0, "epochs_to_val_acc_90": 3}),
            trial(2, 0.9, 1, 1, extra={"seconds_to_val_acc_90": 6.0, "epochs_to_val_acc_90": 3}),
            trial(3, 0.9, 1, 1, point=2, extra={})]
    rows = {r["trial"]: r for r in time_to_accuracy_section("e", runs).rows}
    assert rows[0]["to_90_seconds"] == pytest.approx(5.0) and rows[0]["to_90_epochs"] == pytest.approx(2.5)
    assert math.isnan(rows[2]["to_90_seconds"])  # trial 3 shares point 2 and never got there
    assert time_to_accuracy_section("e", [trial(0, 0.9, 1, 1)]) is None  # a store from before the targets


def test_continuous_keys_get_a_trend_not_groups_of_one():
    runs = [trial(i, 0.80 + 0.01 * i, 1000, 1, **{"train.lr": 10 ** (-4 + i / 2), "model.filters": 8 + 8 * (i % 2)})
            for i in range(6)]
    assert continuous_keys(runs) == ["train.lr"] and discrete_keys(runs) == ["model.filters"]
    assert is_log_scaled(runs, "train.lr")
    (row,) = trends("e", runs).rows
    assert row["scale"] == "log" and row["rho"] == pytest.approx(1.0) and row["n"] == 6
    assert row["slope"] == pytest.approx(0.02)  # +1 point per half decade = +2 points per decade
    assert row["r_squared"] == pytest.approx(1.0)


def test_trend_is_spearman_and_least_squares():
    x, y = [1.0, 2.0, 3.0, 4.0, 5.0], [0.5, 0.7, 0.6, 0.9, 0.8]
    result = trend(x, y)
    expected = scipy_stats.spearmanr(x, y)
    assert result.rho == pytest.approx(expected.statistic)
    assert result.slope == pytest.approx(scipy_stats.linregress(x, y).slope)
    assert math.isnan(trend([1.0, 2.0], [0.5, 0.6]).rho)  # two points: no trend claimed
    many_x = [float(v) for v in range(12)]
    many_y = [0.5 + 0.01 * v + (0.03 if v % 3 == 0 else 0.0) for v in range(12)]
    assert trend(many_x, many_y).p_value == pytest.approx(scipy_stats.spearmanr(many_x, many_y).pvalue)


def test_a_small_sample_gets_the_exact_p_not_the_t_approximation():
    perfect = trend([1.0, 2.0, 3.0], [0.1, 0.2, 0.3])
    assert perfect.rho == pytest.approx(1.0)
    assert perfect.p_value == pytest.approx(1 / 3)  # 2 of the 6 orderings are as extreme; scipy's t says 0
    # n = 5, rho 0.8: 1 - (orderings with |rho| >= 0.8) / 120, counted by hand over all 120 pairings
    import itertools

    x, y = [1.0, 2.0, 3.0, 4.0, 5.0], [0.5, 0.7, 0.6, 0.9, 0.8]
    rho = scipy_stats.spearmanr(x, y).statistic
    extreme = sum(abs(scipy_stats.spearmanr(x, order).statistic) >= abs(rho) - 1e-12
                  for order in itertools.permutations(y))
    assert trend(x, y).p_value == pytest.approx(extreme / 120)


def test_run_counts_add_up_to_the_runs_read():
    runs = [trial(0, 0.9, 1, 1), trial(1, 0.9, 1, 1, tags={"pruned": "true"}),
            trial(2, 0.9, 1, 1, status="FAILED", tags={"failure_reason": "NaN loss"}),
            trial(3, 0.9, 1, 1, status="KILLED"),
            trial(4, 0.9, 1, 1, status="FAILED", tags={"failure_reason": "abandoned: a fresh sweep"}),
            trial(5, 0.9, 1, 1, status="FAILED", tags={"interrupted": "true", "failure_reason": "interrupted"})]
    assert outcome_counts(runs) == {"finished": 1, "pruned": 1, "failed": 1, "cut_off": 3}
    assert runs_line({"e": runs}) == "6 trial runs (1 finished, 1 pruned, 1 failed, 3 cut off)"


def test_spec_difference_names_keys_spaces_and_environment():
    a = [trial(0, 0.9, 1, 1, **{"train.lr": 0.001}), trial(1, 0.9, 1, 1, **{"train.lr": 0.01})]
    b = [trial(0, 0.9, 1, 1, tags={"device": "cuda"})]
    b[0].data_digest = "x"
    for t in a:
        t.params["train.lr"] = str(t.values["train.lr"])
    b[0].params.update({"train.lr": "0.003", "search.space": "{}", "train.epochs": "5"})
    section = spec_difference("A", a, "B", b)
    rows = {r["key"]: (r["a"], r["b"]) for r in section.rows}
    assert rows["train.lr"] == ("searched (2 values)", "0.003") and rows["train.epochs"] == ("3", "5")
    assert rows["search.space"] == (SPACE, "none (one configuration)")
    assert rows["environment: device"] == ("cpu", "cuda")
    assert rows["environment: data (IDX files digest)"] == ("-", "x")
    once = [trial(0, 0.9, 1, 1, **{"model.filters": 32}), trial(1, 0.9, 1, 1, **{"model.filters": 32})]
    for t in once:
        t.params["model.filters"] = "32"
    b[0].params["model.filters"] = "16"
    rows = {r["key"]: (r["a"], r["b"]) for r in spec_difference("A", once, "B", b).rows}
    assert rows["model.filters"] == ("searched (1 value: 32)", "16")  # TPE drew 32 twice: still a searched key
    assert "environment: torch version" not in rows
    assert "not like for like: device, data (IDX files digest) differ" in section.title
