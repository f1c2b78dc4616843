"""Summary statistics and Welch's t-test, with verdicts that do not overclaim on small samples."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats as scipy_stats

ALPHA = 0.05
FEW_RUNS = 5  # below this many runs per group, a verdict is called preliminary


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float  # sample standard deviation (ddof=1); nan for n < 2
    ci_low: float  # 95% confidence interval of the mean (Student's t); nan for n < 2
    ci_high: float


def finite(values: Sequence[float]) -> np.ndarray:
    """The values that are numbers: None, NaN and inf (a run without that metric) are left out."""
    return np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)


def summarize(values: Sequence[float]) -> Summary:
    x = finite(values)
    n = len(x)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    half = float(scipy_stats.t.ppf(1 - ALPHA / 2, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class Comparison:
    a: Summary
    b: Summary
    difference: float  # mean(a) - mean(b)
    ci_low: float  # 95% CI of the difference (Welch-Satterthwaite degrees of freedom)
    ci_high: float
    p_value: float  # two-sided Welch's t-test
    verdict: str

    def exploratory(self, why: str) -> Comparison:
        """The same numbers with a verdict that claims nothing."""
        return replace(self, verdict=why)


def compare(a_values: Sequence[float], b_values: Sequence[float], a_name: str = "A", b_name: str = "B",
            unit: float = 100.0, unit_name: str = "points") -> Comparison:
    """Welch's t-test of mean(a) - mean(b); the verdict is in `unit_name` (percentage points by default)."""
    a, b = summarize(a_values), summarize(b_values)
    diff = a.mean - b.mean
    if a.n < 2 or b.n < 2:
        verdict = (f"cannot test: at least 2 finished runs per group are needed "
                   f"({a_name} has {a.n}, {b_name} has {b.n})")
        return Comparison(a, b, diff, math.nan, math.nan, math.nan, verdict)
    var_a, var_b = a.std**2 / a.n, b.std**2 / b.n
    se = math.sqrt(var_a + var_b)
    if se == 0:
        p = 1.0 if diff == 0 else 0.0
        low = high = diff
    else:  # the p-value and the interval come from the same t and degrees of freedom
        df = (var_a + var_b) ** 2 / (var_a**2 / (a.n - 1) + var_b**2 / (b.n - 1))
        p = float(2 * scipy_stats.t.sf(abs(diff) / se, df))
        half = float(scipy_stats.t.ppf(1 - ALPHA / 2, df)) * se
        low, high = diff - half, diff + half
    return Comparison(a, b, diff, low, high, p, _verdict(a_name, b_name, diff, low, high, p, (a.n, b.n),
                                                         unit, unit_name))


def _verdict(a_name: str, b_name: str, diff: float, low: float, high: float, p: float, sizes: tuple[int, int],
             unit: float, unit_name: str) -> str:
    n_min = min(sizes)
    span = f"95% CI {low * unit:+.2f} to {high * unit:+.2f} {unit_name}"
    runs = f"n = {sizes[0]} vs {sizes[1]}"
    if p < ALPHA:
        better, worse = (a_name, b_name) if diff > 0 else (b_name, a_name)
        text = (f"{better} beats {worse} by {abs(diff) * unit:.2f} {unit_name} ({span}, p={p:.3g}, {runs}): "
                f"a real difference at the 5% level")
        if n_min < FEW_RUNS:
            text += f", but with only {n_min} runs in a group treat it as preliminary"
        return text
    text = f"no significant difference (p={p:.3g}, {runs}); the {span} includes zero"
    if n_min < FEW_RUNS:
        text += f", and with only {n_min} runs in a group a real difference of this size could be missed"
    return text


@dataclass(frozen=True)
class Trend:
    """How a metric moves with a continuous value: Spearman's rank correlation and a least-squares line
    (on log10 of the value where its space is logarithmic: the slope is then per tenfold change)."""

    n: int
    rho: float  # Spearman's rank correlation; nan for n < 3 or a constant side
    p_value: float  # two-sided, for rho = 0
    slope: float  # metric per unit of the value (per decade on a log scale)
    intercept: float
    r_squared: float  # of the straight line


def trend(values: Sequence[float], metric: Sequence[float], log: bool = False) -> Trend:
    pairs = [(x, y) for x, y in zip(values, metric, strict=True)
             if x is not None and y is not None and math.isfinite(x) and math.isfinite(y) and (x > 0 or not log)]
    n = len(pairs)
    x = np.asarray([math.log10(p[0]) if log else p[0] for p in pairs], dtype=float)
    y = np.asarray([p[1] for p in pairs], dtype=float)
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return Trend(n, math.nan, math.nan, math.nan, math.nan, math.nan)
    rank = scipy_stats.spearmanr(x, y)
    # scipy's t approximation says p = 0 for a perfect order of 3 points; the exact p is 1/3
    p_value = _exact_spearman_p(x, y) if n <= EXACT_SPEARMAN_MAX_N else float(rank.pvalue)
    line = scipy_stats.linregress(x, y)
    return Trend(n, float(rank.statistic), p_value, float(line.slope), float(line.intercept), float(line.rvalue**2))


EXACT_SPEARMAN_MAX_N = 8  # 8! orderings take ~0.1 s; above, the t approximation is close enough


def _exact_spearman_p(x: np.ndarray, y: np.ndarray) -> float:
    """Two-sided p of Spearman's rho over every pairing of x with y (rho is Pearson's r on ranks)."""
    x_ranks = scipy_stats.rankdata(x)
    x_centred = x_ranks - x_ranks.mean()

    def rho(y_ranks: np.ndarray, axis: int = -1) -> np.ndarray:
        centred = y_ranks - y_ranks.mean(axis=axis, keepdims=True)
        return (centred * x_centred).sum(axis=axis) / (np.linalg.norm(centred, axis=axis) * np.linalg.norm(x_centred))

    result = scipy_stats.permutation_test((scipy_stats.rankdata(y),), rho, permutation_type="pairings",
                                          n_resamples=np.inf, vectorized=True)
    return float(result.pvalue)


def describe_trend(result: Trend, what: str, per: str) -> str:
    """One line a reader can act on: direction, strength, slope; never more than the sample allows."""
    if not math.isfinite(result.rho):
        return f"cannot estimate a trend (n = {result.n}; at least 3 runs with different values are needed)"
    if result.rho == 0:
        return (f"{what} shows no monotonic trend with it (Spearman rho 0, p={result.p_value:.3g}, n = {result.n})")
    direction = "rises" if result.rho > 0 else "falls"
    strength = next(word for bound, word in ((0.7, "strongly"), (0.4, "moderately"), (0.0, "weakly"))
                    if abs(result.rho) >= bound)
    text = (f"{what} {strength} {direction} with it (Spearman rho {result.rho:+.2f}, p={result.p_value:.3g}, "
            f"n = {result.n}; {result.slope * 100:+.2f} points {per}, R² {result.r_squared:.2f})")
    if result.p_value >= ALPHA:
        text += "; not significant at the 5% level"
    return text
