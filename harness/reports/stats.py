"""Paired comparisons: the mean effect of a paired difference with its Student-t interval, and the
verdict a report states about it."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

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


# --- Two models on the same test examples -------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """Model a against model b on the same n examples: the accuracy difference a - b, its
    paired bootstrap 95 % interval, and the exact McNemar p-value on the discordant pairs."""

    name_a: str
    name_b: str
    diff: float
    low: float
    high: float
    p_value: float
    n: int
    a_only: int  # examples a gets right and b wrong
    b_only: int


def mcnemar_exact(a_correct, b_correct) -> float:
    """Two-sided exact McNemar p-value: a binomial test (p = 1/2) on the discordant pairs."""
    import numpy as np
    from scipy.stats import binomtest

    a, b = np.asarray(a_correct, bool), np.asarray(b_correct, bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def paired_bootstrap(a_correct, b_correct, n_boot: int = 10000, seed: int = 0, level=0.95):
    """(a - b accuracy, low, high): percentile interval over resamples of the examples (the
    same indices for both models), from a seeded generator."""
    import numpy as np

    d = np.asarray(a_correct, float) - np.asarray(b_correct, float)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(d.mean()), float(low), float(high)


def compare(a_correct, b_correct, name_a: str = "a", name_b: str = "b") -> Comparison:
    import numpy as np

    a, b = np.asarray(a_correct, bool), np.asarray(b_correct, bool)
    diff, low, high = paired_bootstrap(a, b)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    return Comparison(name_a, name_b, diff, low, high, mcnemar_exact(a, b), len(a), only_a, only_b)


def claim(c: Comparison) -> str:
    """`beat (+x pt, 95 % CI [a, b])`, `did not beat (...)` or `no clear difference (...)`."""
    body = f"{100 * c.diff:+.1f} pt, 95 % CI [{100 * c.low:+.1f}, {100 * c.high:+.1f}]"
    p = f"McNemar p = {c.p_value:.3g}"
    if c.low > 0:
        return f"beat ({body}; {p})"
    if c.high < 0:
        return f"did not beat ({body}; {p})"
    return f"no clear difference ({body}; the interval includes 0; {p})"


def as_metrics(c: Comparison, prefix: str) -> dict[str, float]:
    return {
        f"{prefix}_diff": c.diff,
        f"{prefix}_ci_low": c.low,
        f"{prefix}_ci_high": c.high,
        f"{prefix}_p": c.p_value,
    }
