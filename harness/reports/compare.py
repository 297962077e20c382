"""Several studies side by side (`report STUDY --compare OTHER...`): each study's baseline,
best trial, soup and classical reference with val and test, its trials and wall time; the
differences between the studies' chosen models on test, paired (`harness.reports.stats`, as
the study's own claims in `harness.reports.comparisons`) only where their test splits are the
same; the settings that differ; the optimization histories overlaid and the best trials'
learning curves on one figure.

Plain data in (a `StudyRecord` per study, which `harness.study.compare` reads from the
stores), text and figures out.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.reports import stats
from harness.reports.comparisons import Claim


@dataclass(frozen=True)
class StudyRecord:
    label: str  # as named on the command line: STUDY or STUDY@WHERE
    kind: str  # task kind: finetune, meta, multitask
    objective: str  # the val metric it chose by (its headline)
    test_metric: str  # its test metric: test_acc, or meta_test_acc_Kshot
    rows: list  # (model, val, test) for baseline, best trial, soup, classical reference
    finished: int  # its own finished trials (complete and pruned)
    complete: int
    seconds: float | None  # its own trials' first start to last end
    history: list  # its own finished trials in order: objective value, None when pruned
    curve: list  # the best trial's objective per epoch
    best: str  # "trial N"
    data_hash: str | None  # the split its best trial was tested on
    correct: np.ndarray | None = None  # the best trial's correctness per test example
    y: tuple | None = None  # the true classes of those examples
    fixed: dict = field(default_factory=dict)  # the settings it did not search, flattened
    space: dict = field(default_factory=dict)  # searched key -> its range, in words
    notes: tuple = ()  # what a reader must know (not tested yet, warm-started, ...)
    maximize: bool = True


def _cell(metric: str, value) -> str:
    return f"{metric} {'-' if value is None else f'{value:.4f}'}"


def _wall(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, sec = divmod(round(seconds), 60)
    return f"{minutes}m {sec:02d}s" if minutes else f"{sec}s"


def table(records: list[StudyRecord]) -> list[str]:
    """One row per model of each study; each study's own metric names in its cells."""
    rows = []
    for r in records:
        for i, (model, val, test) in enumerate(r.rows):
            trials = f"{r.finished} ({r.complete} complete)" if i == 0 else ""
            rows.append(
                (
                    r.label if i == 0 else "",
                    model,
                    _cell(r.objective, val),
                    _cell(r.test_metric, test),
                    trials,
                    _wall(r.seconds) if i == 0 else "",
                )
            )
    head = ("study", "model", "val", "test", "trials finished", "wall time")
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    return ["  ".join(f"{c:<{w}}" for c, w in zip(row, widths, strict=True)).rstrip()
            for row in [head, *rows]]  # fmt: skip


def paired(records: list[StudyRecord]) -> tuple[list[Claim], list[str]]:
    """Each pair of studies' best trials on test: a paired comparison where both were tested
    on the same split (the same data hash, the same true classes), else a line saying why it
    is not paired."""
    claims, unpaired = [], []
    for a, b in itertools.combinations(records, 2):
        la, lb = f"{a.label}'s best trial ({a.best})", f"{b.label}'s best trial ({b.best})"
        why = None
        if a.correct is None or b.correct is None:
            missing = ", ".join(r.label for r in (a, b) if r.correct is None)
            why = f"no per-example test predictions for {missing}"
        elif a.data_hash != b.data_hash or a.y != b.y:
            why = f"the test splits differ (data hash {a.data_hash} vs {b.data_hash})"
        if why:
            unpaired.append(f"{a.label} against {b.label}: not paired, {why}; no interval.")
            continue
        key = f"{a.label}_vs_{b.label}"
        claims.append(Claim(key, la, lb, stats.compare(a.correct, b.correct, la, lb)))
    return claims, unpaired


def differences(records: list[StudyRecord]) -> list[str]:
    """The settings that differ between the studies: the fixed ones, then the searched spaces."""
    out = []
    keys = sorted({k for r in records for k in r.fixed})
    known = [set(r.fixed) | set(r.space) for r in records]
    some = [k for k in keys if not all(k in k_ for k_ in known)]  # another task kind's keys
    for key in keys:
        values = [r.fixed.get(key, "searched" if key in r.space else "-") for r in records]
        if key not in some and len(set(map(str, values))) > 1:
            out.append(
                f"  {key}: "
                + "; ".join(f"{r.label} {v}" for r, v in zip(records, values, strict=True))
            )
    for key in sorted({k for r in records for k in r.space}):
        spaces = [r.space.get(key) for r in records]
        if len(set(map(str, spaces))) > 1:
            shown = "; ".join(
                f"{r.label} {s or 'not searched'}" for r, s in zip(records, spaces, strict=True)
            )
            out.append(f"  searched {key}: {shown}")
    if some:
        out.append(
            f"  and {len(some)} settings that only some of the studies have (their task kinds "
            f"differ): {', '.join(some[:6])}{', ...' if len(some) > 6 else ''}"
        )
    return out


def lines(records: list[StudyRecord]) -> list[str]:
    """The comparison as text: the table, the paired differences, the settings that differ."""
    names = ", ".join(f"{r.label} ({r.kind})" for r in records)
    out = [f"Studies compared: {names}", ""]
    out.append("Side by side (each chosen on its own val; test measured once per model):")
    out += [f"  {line}" for line in table(records)]
    for r in records:
        out += [f"  {r.label}: {n}" for n in r.notes]
    claims, unpaired = paired(records)
    out.append("\nBest trials against each other on test:")
    if claims:
        out.append("  Paired on the same test examples (95 % bootstrap interval, exact McNemar):")
        for c in claims:  # the pair, then the claim (study names keep their case)
            out += [f"  {c.a} against {c.b}:", f"    {stats.claim(c.comparison)}"]
    out += [f"  {line}" for line in unpaired]
    diff = differences(records)
    out.append("\nSettings that differ between the studies:")
    out += diff or ["  none: the same fixed settings and searched space"]
    return out


def metrics(records: list[StudyRecord]) -> dict[str, float]:
    """The comparison's run metrics: each paired difference, interval and p-value."""
    out = {}
    for i, c in enumerate(paired(records)[0]):
        out |= stats.as_metrics(c.comparison, f"pair{i}")
    return out


def history_figure(records: list[StudyRecord]):
    """The optimization histories overlaid: each study's own trials in order, its objective
    (dots) and the best so far (a line), one colour per study."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, r in enumerate(records):
        colour = f"C{i}"
        xs = [n for n, v in enumerate(r.history, 1) if v is not None]
        ys = [v for v in r.history if v is not None]
        if not ys:
            continue
        ax.scatter(xs, ys, s=14, color=colour, alpha=0.5)
        best, run = [], None
        for v in ys:
            run = v if run is None else (max if r.maximize else min)(run, v)
            best.append(run)
        ax.step(xs, best, where="post", color=colour, label=f"{r.label} ({r.objective})")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial (each study's own, in order)")
    ax.set_ylabel(" / ".join(dict.fromkeys(r.objective for r in records)))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def curves_figure(records: list[StudyRecord]):
    """The best trial of each study: its objective per epoch, on one figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    drawn = False
    for i, r in enumerate(records):
        if r.curve:
            ax.plot(range(1, len(r.curve) + 1), r.curve, color=f"C{i}", label=f"{r.label} {r.best}")
            drawn = True
    ax.set_xlabel("epoch")
    ax.set_ylabel(" / ".join(dict.fromkeys(r.objective for r in records)))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if not drawn:
        plt.close(fig)
        return None
    return fig


def write(records: list[StudyRecord], folder: Path) -> list[Path]:
    """report.md and its figures in `folder`; report.md first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    files, md = [], ["# " + " vs ".join(f"`{r.label}`" for r in records), "", "```"]
    md += [*lines(records), "```", ""]
    for name, title, fig in (
        ("history", "Optimization histories (one colour per study)", history_figure(records)),
        ("curves", "Learning curves of each study's best trial", curves_figure(records)),
    ):
        if fig is None:
            continue
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        files.append(path)
        md += [f"## {title}", "", f"![{title}]({path.name})", ""]
    report = folder / "report.md"
    report.write_text("\n".join(md))
    return [report, *files]
