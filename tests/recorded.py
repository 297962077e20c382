"""The one helper for comparing with values recorded elsewhere (goldens, expected metrics),
and the record of how far such values move across CPU kernel paths.

Two properties are tested apart in this suite:

- *Determinism on one machine* (same CPU model, kernel path, thread count, library versions):
  a test runs the same thing twice and compares with `==`, bit for bit. Those tests do not use
  this module.
- *Values computed another way* (recorded once on some CPU; K ranks against one; a re-run on
  another kernel path): a tolerance at least 10x the spread measured across kernel paths by
  `benchmarks/kernel_spread.py` (torch's ATEN_CPU_CAPABILITY default/avx2/avx512, MKL and
  oneDNN capped at AVX2, oneDNN at SSE4.1, 1 and 2 threads; on an Intel Xeon with AVX-512,
  against goldens recorded on an AMD EPYC). Those tests are marked `numerics`; CI runs them
  again on other kernel paths (`make numerics`).

The goldens' tolerances, with the largest spread measured (2026-12-07, every path above):
  - continuous values (losses, learning rates, init fingerprints): relative `REL` 1e-4;
    measured at most 4.6e-6 (22x), at any epoch;
  - accuracies over n examples: one example (measured: none moved; a prediction that sits
    on a tie may flip);
  - a golden whose training amplifies last-bit differences (`chaotic_from=E`): from epoch E
    on, continuous values within `REL_CHAOTIC` 3e-2 and accuracies not compared. The one such
    golden, `full_sgd_wd_decay_all` (lr 0.05, the loss falling fast), moves by 1.3e-6 at epoch
    1, 7.4e-4 at epoch 2 and 2.9e-3 at epoch 3 under ATEN_CPU_CAPABILITY=default, from the
    same initial weights (10x: 3e-2), and by 2 of 100 examples on train_acc (ten times that
    would let any accuracy that matters through). Its first epoch still holds it to `REL`:
    a change to the loss, the optimizer step, the schedule, the augmentation draws or the
    batch order moves epoch 1 by far more than 1e-4.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence

REL = 1e-4  # 22x the largest spread measured (4.6e-6)
REL_CHAOTIC = 3e-2  # 10x the spread of a chaotic golden's later epochs (2.9e-3)
ABS = 1e-8  # absolute floor, for values recorded as 0
# The threads of the numerics tests' trials: 1, as the goldens were recorded; `kernel_spread`
# also runs them with 2 (another split of every reduction).
THREADS = int(os.environ.get("HARNESS_NUMERICS_THREADS", "1"))


def kernel_path() -> str:
    """The kernel path this process computes on, as runs record it (`harness.cpu_kernels`),
    and the threads: 'AVX512, ONEDNN_MAX_CPU_ISA=AVX2/t1'."""
    from harness.tracking.provenance import cpu_kernels

    return f"{cpu_kernels()}/t{THREADS}"


def note_spread(comparison: str, key: str, actual: float, expected: float) -> None:
    """Where `HARNESS_SPREAD_LOG` names a file (benchmarks/kernel_spread.py sets it), append
    how far apart two values computed in two ways are: the input of every tolerance here."""
    log = os.environ.get("HARNESS_SPREAD_LOG")
    if not log or math.isnan(actual) or math.isnan(expected):
        return
    diff = abs(actual - expected)
    scale = max(abs(actual), abs(expected))
    row = {"comparison": comparison, "key": key, "path": kernel_path(), "abs": diff}
    row |= {"rel": diff / scale if diff else 0.0, "scale": scale}
    with open(log, "a") as f:
        f.write(json.dumps(row) + "\n")


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
    comparison: str = "golden",
) -> None:
    """Every key of `expected` is in `actual` and close to it: within one example (1/n) for the
    metrics `examples` names with their n, within `rel` for the others."""
    examples = examples or {}
    missing = sorted(set(expected) - set(actual))
    assert not missing, f"{where}: missing {missing}"
    bad = []
    for key, want in expected.items():
        got = actual[key]
        note_spread(comparison, key, got, want)
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
    comparison: str = "golden",
    chaotic_from: int | None = None,
) -> None:
    """Per-epoch histories: as many epochs, each epoch's recorded keys close (see the module's
    note; from epoch `chaotic_from` on: `REL_CHAOTIC`, accuracies not compared). Every epoch
    is compared (and noted) before the failures are reported."""
    assert len(actual) == len(expected), f"{len(actual)} epochs, recorded {len(expected)}"
    failures = []
    for epoch, (got, want) in enumerate(zip(actual, expected, strict=True), start=1):
        rel, name = REL, comparison
        if chaotic_from is not None and epoch >= chaotic_from:
            want = {k: v for k, v in want.items() if k not in (examples or {})}
            rel, name = REL_CHAOTIC, f"{comparison}:chaotic"
        try:
            assert_matches_recorded(
                got, want, examples=examples, rel=rel, where=f"epoch {epoch}", comparison=name
            )
        except AssertionError as err:
            failures.append(str(err))
    assert not failures, "\n".join(failures)
