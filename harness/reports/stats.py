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
