"""The harness's own figures of the written report, as matplotlib figures (no Optuna here; the
report's plots save them): learning curves with the kept epoch marked, the importances of
several evaluators side by side, gap against accuracy, accuracy against labelled images.
"""

from __future__ import annotations

from harness.config.metrics import KINDS
from harness.reports.report import SeedGroup, Summary, _fmt, headline, kind_of

KEPT = "kept epoch"  # the legend entry of the epoch whose weights a trial kept


def curves_figure(
    curves: dict[int, dict[str, list[float]]],
    labels: dict[int, str],
    kept: dict[int, int | None] | None = None,
):
    """Train and val accuracy per epoch, one panel per trial, the overfitting gap shaded; the
    epoch each trial kept (`kept`: trial -> its best epoch, 1-based) marked on its val curve by
    a dot and a dotted vertical line."""
    import matplotlib.pyplot as plt

    kept = kept or {}
    n = len(curves)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.4), squeeze=False, sharey=True)
    for ax, (number, c) in zip(axes[0], curves.items(), strict=True):
        kind = kind_of(c)
        (train, val), gap, meta = KINDS[kind].curves, KINDS[kind].headline[1], kind == "meta"
        epochs = list(range(1, len(c[val]) + 1))
        ax.plot(epochs, c[train], label=train + ("" if meta else " (eval mode)"))
        ax.plot(epochs, c[val], label=val)
        ax.fill_between(epochs, c[val], c[train], alpha=0.2, label=gap)
        title = labels[number]
        epoch = kept.get(number)
        if epoch is not None and 1 <= int(epoch) <= len(epochs):
            epoch = int(epoch)
            ax.axvline(epoch, color="black", ls=":", lw=1.0)
            y = c[val][epoch - 1]
            ax.plot([epoch], [y], marker="o", ls=":", color="black", ms=5, zorder=3, label=KEPT)
            title += f", kept epoch {epoch}"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("meta-epoch" if meta else "epoch")
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7)
    return fig


def importances_figure(
    panels: dict[str, dict[str, float]], metric: str, notes: dict[str, str] | None = None
):
    """One panel of horizontal bars per evaluator (titled with its name, and its `notes`
    below), the parameters in the same rows in every panel (ordered by the first evaluator),
    so the two read side by side; None when no evaluator has an importance."""
    import matplotlib.pyplot as plt

    panels = {name: ranked for name, ranked in panels.items() if ranked}
    if not panels:
        return None
    order = list(next(iter(panels.values())))
    order += sorted({k for r in panels.values() for k in r} - set(order))
    rows = list(range(len(order)))[::-1]  # the first (most important) at the top
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.2 * len(panels) + 1.5, 0.45 * len(order) + 1.4), squeeze=False
    )
    for i, (ax, (name, ranked)) in enumerate(zip(axes[0], panels.items(), strict=True)):
        values = [ranked.get(k, 0.0) for k in order]
        ax.barh(rows, values, color=f"C{i}")
        for y, v in zip(rows, values, strict=True):
            ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
        ax.set_yticks(rows, order if i == 0 else [""] * len(order))
        ax.set_xlim(0, max(1.0, max(values) * 1.2))
        note = (notes or {}).get(name)
        ax.set_title(f"{name} importance" + (f"\n({note})" if note else ""), fontsize=10)
        ax.set_xlabel(f"share of the importance for {metric}")
    return fig


def gap_vs_acc_figure(summary: Summary):
    """Every complete trial's accuracy and gap at its chosen epoch; the best trial (the
    objective's) and the baseline marked and labelled."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    rows = summary.complete()
    acc, gap = headline(rows[0].attrs)
    xy = {t.number: (t.attrs[acc], t.attrs[gap]) for t in rows}
    ax.scatter(
        [x for x, _ in xy.values()],
        [y for _, y in xy.values()],
        color="tab:blue",
        alpha=0.6,
        label="complete trials",
    )
    best, base = rows[0], summary.baseline()
    marks = [(best.number, "*", 220, "tab:orange", "best")]
    if base is not None:
        marks.append((base.number, "s", 80, "tab:red", "baseline"))
    for number, marker, size, color, what in marks:
        ax.scatter(
            *xy[number],
            marker=marker,
            s=size,
            color=color,
            zorder=3,
            label=f"{what} (trial {number})",
        )
    ax.legend(fontsize=7, loc="best")
    ax.set_xlabel(f"{acc} (best epoch)")
    ax.set_ylabel(f"{gap} = {acc.replace('val', 'train')} - {acc}")
    ax.axhline(0.0, color="grey", lw=0.5)
    return fig


def labels_curve_figure(groups: list[SeedGroup]):
    """Accuracy against labelled images per class (`data.shots_per_class`), one line per
    other setting, mean ± std over seeds; None when no group varies it."""
    import matplotlib.pyplot as plt

    key = "data.shots_per_class"
    lines: dict[str, list[SeedGroup]] = {}
    for g in groups:
        if key in g.params:
            rest = " ".join(f"{k}={_fmt(v)}" for k, v in g.params.items() if k != key)
            lines.setdefault(rest or "all", []).append(g)
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, gs in sorted(lines.items()):
        gs = sorted(gs, key=lambda g: g.params[key])
        ax.errorbar(
            [g.params[key] for g in gs],
            [g.mean for g in gs],
            yerr=[g.std for g in gs],
            marker="o",
            capsize=3,
            label=label,
        )
    ax.set_xscale("log")
    shots = sorted({g.params[key] for g in groups if key in g.params})
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.minorticks_off()
    ax.set_xlabel("labelled images per class (log scale)")
    ax.set_ylabel(f"{groups[0].metric} (mean ± std over seeds)")
    ax.legend(fontsize=7)
    return fig
