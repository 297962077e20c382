"""What a study's end says about its models, side by side and with uncertainty: the baseline,
the best trial, the uniform and greedy soups and the classical reference, val and test; and
each claim ("beat", "did not beat", "no clear difference") as a paired comparison on the same
test examples (`harness.reports.stats`: exact McNemar and a paired bootstrap interval).

Plain data in, text and metrics out: the study layer hands it the models' test predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from harness.reports import stats

# (metric prefix on the parent run, what is compared with what)
PAIRS = (
    ("best_vs_baseline", "the best trial", "the baseline"),
    ("best_vs_classical", "the best trial", "the classical reference"),
    ("soup_vs_best", "the soup", "the best trial"),
)


@dataclass(frozen=True)
class Claim:
    key: str  # the metric prefix, e.g. best_vs_baseline
    a: str  # e.g. "the best trial (trial 10)"
    b: str
    comparison: stats.Comparison

    def sentence(self) -> str:
        return f"{self.a[0].upper()}{self.a[1:]} against {self.b}: {stats.claim(self.comparison)}"


def _correct(pred, y) -> np.ndarray:
    return np.asarray(pred) == np.asarray(y)


def reference(summary):
    """The classical reference the study is measured against: the one best on val (never
    chosen on test), or None."""
    refs = summary.classical
    return max(refs, key=lambda r: r.val_acc) if refs else None


def _models(summary, predictions: dict) -> dict[str, tuple[str, np.ndarray]]:
    """{role: (label, per-example correctness on test)} of the models with stored predictions."""
    out = {}
    complete, base = summary.complete(), summary.baseline()
    if complete and complete[0].number in predictions:
        n = complete[0].number
        out["the best trial"] = (f"the best trial (trial {n})", _correct(*predictions[n]))
    if base is not None and base.number in predictions:
        n = base.number
        out["the baseline"] = (f"the baseline (trial {n})", _correct(*predictions[n]))
    ref = reference(summary)
    if ref is not None and getattr(ref, "test_correct", None) is not None:
        out["the classical reference"] = (
            f"the classical reference ({ref.label})",
            np.asarray(ref.test_correct, dtype=bool),
        )
    made = summary.soups.get(summary.soups.chosen) if summary.soups else None
    alone = made is not None and complete and made.ingredients == (complete[0].number,)
    if made is not None and made.pred and not alone:  # a soup of the best trial alone is it
        out["the soup"] = (f"the {made.kind} soup", _correct(made.pred, made.y))
    return out


def paired(summary, predictions: dict) -> list[Claim]:
    """The claims the study can make: best vs baseline, best vs classical reference, soup vs
    best, each where both models were tested on the same examples."""
    models = _models(summary, predictions)
    out = []
    for key, a, b in PAIRS:
        if a in models and b in models and len(models[a][1]) == len(models[b][1]):
            (la, ca), (lb, cb) = models[a], models[b]
            out.append(Claim(key, la, lb, stats.compare(ca, cb, la, lb)))
    return out


def metrics(summary) -> dict[str, float]:
    """The parent run's metrics: each soup's val and test, and each claim's difference,
    interval and McNemar p-value."""
    out = {}
    for s in summary.soups.soups if summary.soups else ():
        out |= {f"soup_{s.kind}_{k}": v for k, v in s.metrics.items()}
    for c in summary.comparisons:
        out |= stats.as_metrics(c.comparison, c.key)
    return out


def lines(summary) -> list[str]:
    """The side-by-side table (val and test) and the claims, for the CLI and report.md."""
    rows = []
    complete, base = summary.complete(), summary.baseline()

    def add(label: str, val, test) -> None:
        rows.append((label, val, test))

    if base is not None:
        add(
            f"baseline (trial {base.number})",
            base.attrs.get("val_acc"),
            summary.test.get(base.number, {}).get("test_acc"),
        )
    if complete:
        b = complete[0]
        add(
            f"best trial (trial {b.number})",
            b.attrs.get("val_acc"),
            summary.test.get(b.number, {}).get("test_acc"),
        )
    soups = summary.soups
    for s in soups.soups if soups else ():
        mark = " (the study's soup)" if s.kind == soups.chosen else ""
        n = len(s.ingredients)
        add(
            f"{s.kind} soup of {n} trial{'s' * (n > 1)}{mark}",
            s.metrics.get("val_acc"),
            s.metrics.get("test_acc"),
        )
    ref = reference(summary)
    if ref is not None:
        add(f"classical: {ref.label}", ref.val_acc, ref.test_acc)
    if len(rows) < 2 and not (soups and soups.notes):
        return []
    width = max(len(r[0]) for r in rows) if rows else 0
    out = ["\nVal and test side by side (chosen on val; test measured once per model):"]
    out.append(f"  {'model':<{width}}  val_acc  test_acc")

    def cell(v) -> str:
        return "      -" if v is None else f"{v:7.4f}"

    out += [f"  {label:<{width}}  {cell(v)}  {cell(t)}" for label, v, t in rows]
    if soups and soups.soups:
        for s in soups.soups:
            out.append(f"  {s.kind} soup: trials {', '.join(map(str, s.ingredients))}")
            if complete and s.ingredients == (complete[0].number,):
                out.append(
                    f"  (every other candidate lowered the {s.kind} soup's val score: it is the "
                    "best trial's model, and is not compared with it)"
                )
        out.append("  (BatchNorm statistics of each soup re-measured on the train split)")
    out += [f"  {n}" for n in (soups.notes if soups else ())]
    if summary.comparisons:
        out.append("Paired on the same test examples (95 % bootstrap interval, exact McNemar):")
        for c in summary.comparisons:  # the pair, then the claim: each fits 120 columns
            head, claim = c.sentence().split(": ", 1)
            out += [f"  {head}:", f"    {claim}"]
    return out
