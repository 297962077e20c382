"""Two models compared on one test split, example by example (reports.stats): the exact McNemar
test, the paired bootstrap interval, and the claim a report words from them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from harness.reports import stats


def _vectors(both: int, a_only: int, b_only: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-example correctness of a and b with the given counts of each kind of pair."""
    a = [True] * both + [True] * a_only + [False] * b_only + [False] * neither
    b = [True] * both + [False] * a_only + [True] * b_only + [False] * neither
    return np.array(a), np.array(b)


# --- McNemar ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("a_only", "b_only", "expected"),
    [
        (1, 5, 2 * (math.comb(6, 0) + math.comb(6, 1)) / 2**6),  # 14/64 = 0.21875
        (5, 1, 2 * (math.comb(6, 0) + math.comb(6, 1)) / 2**6),  # symmetric
        (12, 2, 2 * (1 + 14 + math.comb(14, 2)) / 2**14),
        (0, 7, 2 / 2**7),
        (3, 3, 1.0),  # 2 P(X <= 3) = 84/64, capped at 1
        (0, 0, 1.0),  # no discordant pair
    ],
)
def test_mcnemar_exact_matches_the_binomial_by_hand(a_only, b_only, expected):
    a, b = _vectors(40, a_only, b_only, 9)
    assert stats.discordant(a, b) == (a_only, b_only)
    assert stats.mcnemar_exact(a, b) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_matches_scipys_binomial_test():
    from scipy.stats import binomtest

    rng = np.random.default_rng(3)
    for _ in range(20):
        a, b = rng.random(200) < 0.8, rng.random(200) < 0.75
        x, y = stats.discordant(a, b)
        expected = binomtest(min(x, y), x + y, 0.5).pvalue if x + y else 1.0
        assert stats.mcnemar_exact(a, b) == pytest.approx(expected, rel=1e-9)


def test_the_vectors_must_pair_up():
    with pytest.raises(ValueError):
        stats.mcnemar_exact([True, False], [True])
    with pytest.raises(ValueError):
        stats.paired_bootstrap([], [])


# --- the paired bootstrap --------------------------------------------------------------------
def test_identical_vectors_have_no_difference_and_a_zero_interval():
    a = np.random.default_rng(0).random(300) < 0.7
    assert stats.paired_bootstrap(a, a.copy()) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("k", [1, 7, 40])
def test_a_right_everywhere_b_wrong_on_k(k):
    n = 200
    a, b = _vectors(n - k, k, 0, 0)
    diff, low, high = stats.paired_bootstrap(a, b, n_boot=2000, seed=1)
    assert diff == k / n
    assert 0.0 <= low <= diff <= high <= 1.0


def test_the_interval_is_the_percentiles_of_resampled_examples_by_hand():
    rng = np.random.default_rng(5)
    a, b = rng.random(50) < 0.8, rng.random(50) < 0.6
    diff, low, high = stats.paired_bootstrap(a, b, n_boot=2000, seed=11, level=0.9)
    # by hand: the same indices for both, from the same generator
    gen = np.random.default_rng(11)
    idx = gen.integers(0, 50, size=(2000, 50))
    means = a[idx].mean(axis=1) - b[idx].mean(axis=1)
    assert diff == pytest.approx(a.mean() - b.mean(), abs=1e-15)
    assert low == pytest.approx(np.quantile(means, 0.05), abs=1e-12)
    assert high == pytest.approx(np.quantile(means, 0.95), abs=1e-12)


def test_the_interval_is_close_to_the_normal_one_on_a_large_split():
    rng = np.random.default_rng(2)
    a, b = rng.random(4000) < 0.9, rng.random(4000) < 0.85
    diff, low, high = stats.paired_bootstrap(a, b, n_boot=4000)
    d = a.astype(float) - b.astype(float)
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    assert low == pytest.approx(diff - half, abs=0.15 * half)
    assert high == pytest.approx(diff + half, abs=0.15 * half)


def test_the_bootstrap_is_deterministic_for_a_seed():
    rng = np.random.default_rng(4)
    a, b = rng.random(500) < 0.7, rng.random(500) < 0.7
    assert stats.paired_bootstrap(a, b, seed=7) == stats.paired_bootstrap(a, b, seed=7)
    assert stats.paired_bootstrap(a, b, seed=7) != stats.paired_bootstrap(a, b, seed=8)


# --- the claim -------------------------------------------------------------------------------
def _comparison(diff, low, high, p):
    return stats.Comparison("fine-tuning", "RBF SVC", diff, low, high, p, 500, 20, 9)


@pytest.mark.parametrize(
    ("diff", "low", "high", "p", "text"),
    [
        (0.021, 0.004, 0.031, 0.012, "beat (+2.1 pt, 95 % CI [+0.4, +3.1]); McNemar p = 0.012"),
        (
            -0.015,
            -0.03,
            -0.002,
            0.04,
            "did not beat (-1.5 pt, 95 % CI [-3.0, -0.2]); McNemar p = 0.040",
        ),
        (
            0.003,
            -0.012,
            0.018,
            0.74,
            "no clear difference (+0.3 pt, 95 % CI [-1.2, +1.8]; the interval includes 0); "
            "McNemar p = 0.740",
        ),
        (
            0.0,
            0.0,
            0.0,
            1.0,
            "no clear difference (+0.0 pt, 95 % CI [+0.0, +0.0]; the interval "
            "includes 0); McNemar p = 1.000",
        ),
        (0.12, 0.08, 0.16, 2e-9, "beat (+12.0 pt, 95 % CI [+8.0, +16.0]); McNemar p < 0.001"),
    ],
)
def test_the_claim_in_words(diff, low, high, p, text):
    assert stats.claim(_comparison(diff, low, high, p)) == text


def test_compare_end_to_end_and_its_metrics():
    a, b = _vectors(150, 30, 5, 15)  # a: 180/200 right, b: 155/200
    c = stats.compare(a, b, "fine-tuning", "logistic regression")
    assert (c.name_a, c.name_b, c.n, c.a_only, c.b_only) == (
        "fine-tuning",
        "logistic regression",
        200,
        30,
        5,
    )
    assert c.diff == pytest.approx(25 / 200) and 0 < c.low < c.diff < c.high
    assert c.p_value == pytest.approx(2 * sum(math.comb(35, i) for i in range(6)) / 2**35)
    assert stats.claim(c).startswith("beat (+12.5 pt, 95 % CI [+")
    assert stats.as_metrics(c, "vs_svc") == {
        "vs_svc_diff": c.diff,
        "vs_svc_ci_low": c.low,
        "vs_svc_ci_high": c.high,
        "vs_svc_p": c.p_value,
    }
    reverse = stats.compare(b, a, "logistic regression", "fine-tuning")
    assert reverse.p_value == c.p_value and reverse.diff == -c.diff
    assert stats.claim(reverse).startswith("did not beat (-12.5 pt")
