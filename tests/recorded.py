"""The one helper for comparing with values recorded elsewhere (goldens, expected metrics).

Two properties are tested apart in this suite:

- *Determinism on one machine* (same CPU model, thread count, library versions): a test runs
  the same thing twice and compares with `==`, bit for bit. Those tests do not use this module.
- *Regression against values recorded once, on some machine*: this module. Another CPU of the
  same architecture sums in another order inside the vectorised kernels (seen: the 7th
  significant digit of a loss on an AVX-512 Xeon against goldens recorded on another CPU), so
  such a comparison is within a tolerance that absorbs kernel and summation-order differences
  and still catches a change to the algorithm:
  - continuous values (losses, learning rates, weights): relative `REL` (1e-5, about 80 float32
    ulps: the drift seen was 1e-7 relative after one epoch, 1e-6 after three);
  - accuracies over n examples: one example, 1/n (a prediction that sits on a tie may flip).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

REL = 1e-5  # relative tolerance on continuous values recorded elsewhere
ABS = 1e-8  # absolute floor, for values recorded as 0


def close(actual: float, expected: float, *, rel: float = REL, abs_tol: float = ABS) -> bool:
    """math.isclose with the suite's stated tolerance; NaN equals NaN."""
    if math.isnan(actual) or math.isnan(expected):
        return math.isnan(actual) and math.isnan(expected)
    return math.isclose(actual, expected, rel_tol=rel, abs_tol=abs_tol)


def assert_matches_recorded(
    actual: Mapping[str, float],
    expected: Mapping[str, float],
    *,
    examples: Mapping[str, int] | None = None,
    rel: float = REL,
    where: str = "",
) -> None:
    """Every key of `expected` is in `actual` and close to it: within one example (1/n) for the
    metrics `examples` names with their n, within `rel` for the others."""
    examples = examples or {}
    missing = sorted(set(expected) - set(actual))
    assert not missing, f"{where}: missing {missing}"
    bad = []
    for key, want in expected.items():
        got = actual[key]
        if key in examples:
            ok = abs(got - want) <= 1.0 / examples[key] + 1e-12
            allowed = f"one example in {examples[key]}"
        else:
            ok = close(got, want, rel=rel)
            allowed = f"rel {rel:g}"
        if not ok:
            bad.append(f"{key}: got {got!r}, recorded {want!r} (allowed: {allowed})")
    assert not bad, f"{where}: " + "; ".join(bad)


def assert_history_matches_recorded(
    actual: Sequence[Mapping[str, float]],
    expected: Sequence[Mapping[str, float]],
    *,
    examples: Mapping[str, int] | None = None,
    rel: float = REL,
) -> None:
    """Per-epoch histories: as many epochs, each epoch's recorded keys close (see above)."""
    assert len(actual) == len(expected), f"{len(actual)} epochs, recorded {len(expected)}"
    for epoch, (got, want) in enumerate(zip(actual, expected, strict=True), start=1):
        assert_matches_recorded(got, want, examples=examples, rel=rel, where=f"epoch {epoch}")
