"""Paired comparisons: the mean effect of a paired difference with its Student-t interval, and the
verdict a report states about it; and two models compared on one test split, example by example
(the exact McNemar test, a paired bootstrap interval, the claim a report may word from them).
Pure functions: no MLflow, no Optuna."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np

from harness.config.metrics import direction


def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided Student's t quantile with `df` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


@dataclass(frozen=True)
class Effect:
    """The mean of paired differences over seeds and its 95 % interval's half-width."""

    mean: float
    half: float  # nan with one seed: no interval
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half


def paired(a: list[float], b: list[float]) -> Effect:
    """Effect of a over b from runs paired by seed: mean of a_i - b_i ± t(0.975, n-1) s/sqrt(n)."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return Effect(mean, math.nan, n)
    return Effect(mean, t_quantile(n - 1) * statistics.stdev(diffs) / math.sqrt(n), n)


def maximized(metric: str) -> bool:
    """Whether higher is better: the objectives' directions, and test accuracies."""
    return direction(metric) == "maximize" or metric.startswith(("test_acc", "meta_test_acc"))


def _scaled(metric: str) -> tuple[float, str]:
    """Accuracies in percentage points, other metrics as they are."""
    return (100.0, " pt") if "acc" in metric else (1.0, "")


def amount(effect: Effect, metric: str) -> str:
    scale, unit = _scaled(metric)
    digits = 1 if unit else 4
    if math.isnan(effect.half):
        return f"{effect.mean * scale:+.{digits}f}{unit} (one seed: no interval)"
    return f"{effect.mean * scale:+.{digits}f} ± {effect.half * scale:.{digits}f}{unit}"


def verdict(effect: Effect, metric: str) -> str:
    """'helps: +2.1 ± 0.8 pt' when the interval excludes 0 on the metric's better side,
    'hurts: ...' on the other, else no effect distinguishable from seed noise."""
    sign = 1.0 if maximized(metric) else -1.0
    if not math.isnan(effect.half):
        if sign * effect.low > 0 and sign * effect.high > 0:
            return f"helps: {amount(effect, metric)}"
        if sign * effect.low < 0 and sign * effect.high < 0:
            return f"hurts: {amount(effect, metric)}"
    return f"no effect distinguishable from seed noise ({amount(effect, metric)})"


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


# --- two models on one test split, example by example ----------------------------------------
def _pair(a_correct, b_correct) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"two per-example vectors of one test split, got {a.shape} and {b.shape}")
    return a, b


def discordant(a_correct, b_correct) -> tuple[int, int]:
    """(#(a right, b wrong), #(a wrong, b right)): the pairs McNemar's test looks at."""
    a, b = _pair(a_correct, b_correct)
    return int((a & ~b).sum()), int((~a & b).sum())


def mcnemar_exact(a_correct, b_correct) -> float:
    """The exact two-sided McNemar p-value: with b = #(a right, b wrong) and c = #(a wrong,
    b right), p = min(1, 2 P(X <= min(b, c))) for X ~ Bin(b + c, 1/2); 1.0 when b + c == 0."""
    from scipy.stats import binom

    only_a, only_b = discordant(a_correct, b_correct)
    n = only_a + only_b
    if n == 0:
        return 1.0
    return min(1.0, 2.0 * float(binom.cdf(min(only_a, only_b), n, 0.5)))


def paired_bootstrap(
    a_correct, b_correct, n_boot: int = 10000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(diff, low, high): a's accuracy minus b's, and its percentile bootstrap interval, the
    test examples resampled with replacement (the same indices for both), `n_boot` times from
    `np.random.default_rng(seed)`: the same inputs give the same interval."""
    a, b = _pair(a_correct, b_correct)
    d = a.astype(np.int8) - b.astype(np.int8)  # +1, 0, -1 per example
    n = len(d)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // n)  # rows of indices at a time: bounded memory
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        means[start : start + rows] = d[rng.integers(0, n, size=(rows, n))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(d.mean()), float(low), float(high)


@dataclass(frozen=True)
class Comparison:
    """Model a against model b on the same test examples: accuracy difference a - b (a
    fraction), its bootstrap interval, McNemar's p, the examples and the discordant pairs."""

    name_a: str
    name_b: str
    diff: float
    low: float
    high: float
    p_value: float
    n: int
    a_only: int  # a right, b wrong
    b_only: int  # a wrong, b right
    level: float = 0.95


def compare(
    a_correct, b_correct, name_a: str, name_b: str, n_boot: int = 10000, seed: int = 0
) -> Comparison:
    """a against b from their per-example correctness on one test split (the same order)."""
    diff, low, high = paired_bootstrap(a_correct, b_correct, n_boot, seed)
    a_only, b_only = discordant(a_correct, b_correct)
    p = mcnemar_exact(a_correct, b_correct)
    return Comparison(name_a, name_b, diff, low, high, p, len(a_correct), a_only, b_only)


def _p_text(p: float) -> str:
    return "McNemar p < 0.001" if p < 0.001 else f"McNemar p = {p:.3f}"


def claim(c: Comparison) -> str:
    """What a report may say of a against b: 'beat (+2.1 pt, 95 % CI [+0.4, +3.1]); McNemar
    p = 0.012' when the interval is above 0, 'did not beat (-1.5 pt, ...)' when below, else
    'no clear difference (+0.3 pt, 95 % CI [-1.2, +1.8]; the interval includes 0); ...'.
    Points are percentage points of accuracy."""
    ci = f"{c.diff * 100:+.1f} pt, {c.level * 100:g} % CI [{c.low * 100:+.1f}, {c.high * 100:+.1f}]"
    if c.low > 0:
        words = f"beat ({ci})"
    elif c.high < 0:
        words = f"did not beat ({ci})"
    else:
        words = f"no clear difference ({ci}; the interval includes 0)"
    return f"{words}; {_p_text(c.p_value)}"


def as_metrics(c: Comparison, prefix: str) -> dict[str, float]:
    """The comparison as run metrics (fractions, not points): PREFIX_diff, _ci_low, _ci_high, _p."""
    return {
        f"{prefix}_diff": c.diff,
        f"{prefix}_ci_low": c.low,
        f"{prefix}_ci_high": c.high,
        f"{prefix}_p": c.p_value,
    }
