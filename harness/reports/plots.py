"""The written report: PNG plots and report.md under RESULTS/reports/STUDY/ (Optuna's own
matplotlib plots where they fit, and the harness's: learning curves, gap against accuracy,
accuracy against labelled images). Reads the text of `harness.reports.report`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from harness.config.metrics import KINDS
from harness.config.tags import Tag
from harness.reports.report import SeedGroup, Summary, _fmt, headline, kind_of, render, seed_groups


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _optuna_plot(fn, study, path: Path, **kwargs) -> Path | None:
    try:
        with warnings.catch_warnings():  # "experimental", "few trials per regime"
            warnings.simplefilter("ignore")
            ax = fn(study, **kwargs)
    except (ValueError, RuntimeError, ZeroDivisionError):  # too few trials for this plot
        return None
    fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
    return _save(fig, path)


def plot_curves(curves: dict[int, dict[str, list[float]]], labels: dict[int, str], path: Path):
    """Train and val accuracy per epoch, one panel per trial, the overfitting gap shaded."""
    import matplotlib.pyplot as plt

    n = len(curves)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.2), squeeze=False, sharey=True)
    for ax, (number, c) in zip(axes[0], curves.items(), strict=True):
        kind = kind_of(c)
        (train, val), gap, meta = KINDS[kind].curves, KINDS[kind].headline[1], kind == "meta"
        epochs = list(range(1, len(c[val]) + 1))
        ax.plot(epochs, c[train], label=train + ("" if meta else " (eval mode)"))
        ax.plot(epochs, c[val], label=val)
        ax.fill_between(epochs, c[val], c[train], alpha=0.2, label=gap)
        ax.set_title(labels[number])
        ax.set_xlabel("meta-epoch" if meta else "epoch")
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def plot_gap_vs_acc(summary: Summary, path: Path) -> Path:
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
    ax.scatter(
        *xy[best.number],
        marker="*",
        s=220,
        color="tab:orange",
        zorder=3,
        label=f"best (trial {best.number})",
    )
    if base is not None:
        ax.scatter(
            *xy[base.number],
            marker="s",
            s=80,
            color="tab:red",
            zorder=3,
            label=f"baseline (trial {base.number})",
        )
    ax.legend(fontsize=7, loc="best")
    ax.set_xlabel(f"{acc} (best epoch)")
    ax.set_ylabel(f"{gap} = {acc.replace('val', 'train')} - {acc}")
    ax.axhline(0.0, color="grey", lw=0.5)
    return _save(fig, path)


def plot_labels_curve(groups: list[SeedGroup], path: Path) -> Path | None:
    """Accuracy against labelled images per class (`data.shots_per_class`), one line per
    other setting, mean ± std over seeds."""
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
    return _save(fig, path)


def searched(study):
    """The study's searched trials alone (the baseline left out: it has no sampled values, and
    Optuna's importances rank only the parameters every complete trial has), as an in-memory
    study; and the parameters every complete one of them has."""
    import optuna

    copy = optuna.create_study(directions=study.directions)
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(Tag.BASELINE)]
    copy.add_trials(trials)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    common = set.intersection(*(set(t.params) for t in complete)) if complete else set()
    return copy, sorted(common)


def importances(study, objective_index: int = 0) -> dict[str, float]:
    """fANOVA importances over the searched trials ({} when too few)."""
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    copy, common = searched(study)
    if not common:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return get_param_importances(
                copy,
                evaluator=FanovaImportanceEvaluator(seed=0),
                params=common,
                target=lambda t: t.values[objective_index],
            )
    except (ValueError, RuntimeError, ZeroDivisionError):
        return {}


def plot_parallel(study, summary: Summary, path: Path) -> Path | None:
    """Parallel coordinates of the searched trials over the parameters they all have, on a
    figure wide enough for its tick labels."""
    import optuna.visualization.matplotlib as ovm

    copy, common = searched(study)
    if len(common) < 1:
        return None
    kwargs = {"params": common}
    if len(summary.objectives) > 1:
        kwargs |= {"target": lambda t: t.values[0], "target_name": summary.objectives[0]}
    elif summary.objectives:
        kwargs["target_name"] = summary.objectives[0]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ax = ovm.plot_parallel_coordinate(copy, **kwargs)
    except (ValueError, RuntimeError, ZeroDivisionError):
        return None
    fig = ax.get_figure()
    fig.set_size_inches(max(8.0, 2.2 * (len(common) + 1)), 5.0)
    for label in ax.get_xticklabels():
        label.set_rotation(20)
        label.set_horizontalalignment("right")
    return _save(fig, path)


def write_report(study, summary: Summary, curves, labels, folder: Path) -> list[Path]:
    """PNG plots and a report.md that reads on its own; returns report.md first, then plots."""
    import matplotlib

    matplotlib.use("Agg")
    import optuna.visualization.matplotlib as ovm
    from optuna.importance import FanovaImportanceEvaluator

    folder.mkdir(parents=True, exist_ok=True)
    first = {}  # several objectives: the single-objective plots show the first
    if len(summary.objectives) > 1:
        first = {"target": lambda t: t.values[0], "target_name": summary.objectives[0]}
    copy, common = searched(study)
    plots = {
        "Optimization history": _optuna_plot(
            ovm.plot_optimization_history, study, folder / "history.png", **first
        ),
        "Parameter importances (fANOVA, the searched trials)": (
            _optuna_plot(
                ovm.plot_param_importances,
                copy,
                folder / "importances.png",
                evaluator=FanovaImportanceEvaluator(seed=0),
                params=common,
                **first,
            )
            if common
            else None
        ),
        "Parallel coordinates (the searched trials)": plot_parallel(
            study, summary, folder / "parallel.png"
        ),
        "Learning curves of the top trials and the baseline": (
            plot_curves(curves, labels, folder / "curves.png") if curves else None
        ),
        "Pareto front": (
            _optuna_plot(
                ovm.plot_pareto_front,
                study,
                folder / "pareto.png",
                target_names=list(summary.objectives),
            )
            if summary.pareto
            else None
        ),
        "Accuracy against labelled images per class": plot_labels_curve(
            seed_groups(summary), folder / "labels_curve.png"
        ),
        "Overfitting gap against the objective's accuracy, every complete trial": (
            plot_gap_vs_acc(summary, folder / "gap_vs_acc.png") if summary.complete() else None
        ),
    }
    text = render(summary).split("\nOpen the MLflow UI")[0]
    md = [f"# Study `{summary.study_name}`", "", "```", text.rstrip(), "```", ""]
    ranked = importances(study)
    if ranked:
        md += ["## Which searched parameters mattered (fANOVA importance)", ""]
        md += [f"- `{k}`: {v:.3f}" for k, v in ranked.items()] + [""]
    for title, path in plots.items():
        if path is not None:
            md += [f"## {title}", "", f"![{title}]({path.name})", ""]
    report = folder / "report.md"
    report.write_text("\n".join(md))
    return [report, *(p for p in plots.values() if p is not None)]
