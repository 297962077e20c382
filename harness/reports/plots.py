"""The written report: PNG plots and report.md under RESULTS/reports/STUDY/ (Optuna's own
matplotlib plots where they fit, their axes named after the objective; and the harness's
figures of `harness.reports.figures`: learning curves with the kept epoch, importances of two
evaluators, gap against accuracy, accuracy against labelled images). Every plot is saved here.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from harness.config.tags import Tag
from harness.reports import figures
from harness.reports.report import Summary, render, seed_groups

PARALLEL_AXES = 6  # parallel coordinates: the most important parameters shown, at most
# The evaluators of the importances: fANOVA (Optuna's default) and PED-ANOVA (the one Optuna
# Dashboard shows: optuna_dashboard/_importance.py calls `PedAnovaImportanceEvaluator()`).
EVALUATORS = ("fANOVA", "PED-ANOVA")
MEASURES = {  # what each evaluator's importance is, in a panel's subtitle
    "fANOVA": "variance explained, whole space",
    "PED-ANOVA": "best 10% of trials against all",
}
DISAGREE = (
    "fANOVA fits a random forest to the objective over the whole searched space and ranks a "
    "parameter by the share of the forest's variance it explains; PED-ANOVA (Optuna "
    "Dashboard's evaluator) compares where the best 10% of trials put a parameter with where "
    "all trials put it (the Pearson divergence of the two densities). So a parameter that "
    "moves the objective a lot on average but does not set the best trials apart ranks higher "
    "in fANOVA, and one the best trials agree on ranks higher in PED-ANOVA; with few trials "
    "either can be noise."
)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _quiet(fn, *args, **kwargs):
    """An Optuna call with its warnings silenced ("experimental", "few trials per regime");
    None when there are too few trials for it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)
    except (ValueError, RuntimeError, ZeroDivisionError):
        return None


def _figure(ax):
    return None if ax is None else (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()


def _metric(summary: Summary) -> str:
    return summary.objectives[0] if summary.objectives else "objective"


def _target(summary: Summary) -> dict:
    """The keyword arguments that make an Optuna plot show the first objective, by its name."""
    name = _metric(summary)
    if len(summary.objectives) > 1:  # several objectives: single-objective plots show the first
        return {"target": lambda t: t.values[0], "target_name": name}
    return {"target_name": name}


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


def importances(study, objective_index: int = 0, evaluator: str = "fANOVA") -> dict[str, float]:
    """The importances of `evaluator` (one of EVALUATORS) over the searched trials, most
    important first ({} when too few). PED-ANOVA is run as Optuna Dashboard runs it: on the
    objective made lower-is-better, its best 10% against all trials."""
    from optuna.importance import (
        FanovaImportanceEvaluator,
        PedAnovaImportanceEvaluator,
        get_param_importances,
    )

    copy, common = searched(study)
    if not common:
        return {}
    sign = 1.0
    if evaluator == "fANOVA":
        chosen = FanovaImportanceEvaluator(seed=0)
    elif evaluator == "PED-ANOVA":
        chosen = PedAnovaImportanceEvaluator()
        sign = -1.0 if copy.directions[objective_index].name == "MAXIMIZE" else 1.0
    else:
        raise ValueError(f"unknown evaluator {evaluator!r}; one of {EVALUATORS}")
    ranked = _quiet(
        get_param_importances,
        copy,
        evaluator=chosen,
        params=common,
        target=lambda t: sign * t.values[objective_index],
    )
    return dict(ranked or {})


def history_figure(study, summary: Summary):
    """Optuna's optimization history, its y axis named after the objective (None: too few)."""
    import optuna.visualization.matplotlib as ovm

    fig = _figure(_quiet(ovm.plot_optimization_history, study, **_target(summary)))
    if fig is not None:
        from matplotlib.ticker import MaxNLocator

        ax, name = fig.axes[0], _metric(summary)
        ax.set_title(f"Optimization history of {name}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trial numbers
        legend = ax.get_legend()
        if legend is not None:
            words = {name: f"{name} of a complete trial", "Best Value": f"best {name} so far"}
            for text in legend.get_texts():
                text.set_text(words.get(text.get_text(), text.get_text()))
    return fig


def parallel_figure(study, summary: Summary, ranked: dict[str, float] | None = None):
    """Parallel coordinates of the searched trials over the PARALLEL_AXES parameters that
    matter most (`ranked`: the fANOVA importances, most important first; else the first in name
    order) and the objective, on a figure wide enough for its labels, the tick labels on a
    white ground so that the lines do not cross them. None when nothing is searched."""
    import optuna.visualization.matplotlib as ovm

    copy, common = searched(study)
    if not common:
        return None
    order = [k for k in (ranked or {}) if k in common] or common
    shown = order[:PARALLEL_AXES]
    fig = _figure(_quiet(ovm.plot_parallel_coordinate, copy, params=shown, **_target(summary)))
    if fig is None:
        return None
    fig.set_size_inches(max(8.0, 2.0 * (len(shown) + 1) + 2.0), 5.5)
    ax = fig.axes[0]
    if len(summary.objectives) > 1 and study.directions[0].name == "MAXIMIZE":
        for lines in ax.collections:  # Optuna takes a target as minimized: dark = best again
            lines.set_cmap("Blues")
    which = "every parameter"
    if len(shown) < len(common):
        by = "by fANOVA importance" if ranked else "the first by name"
        which = f"{len(shown)} of the {len(common)} parameters ({by})"
    ax.set_title(f"Parallel coordinates: {_metric(summary)} and {which}", y=1.04)
    ax.set_xticks(ax.get_xticks(), [_short(t.get_text()) for t in ax.get_xticklabels()])
    for label in ax.get_xticklabels():
        label.set_rotation(20)
        label.set_horizontalalignment("right")
    ground = {"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 1.0}
    for twin in fig.axes:
        if twin is not ax and twin.get_label() != "<colorbar>":
            twin.grid(False)  # one grid (the objective's), not one per parameter
        for label in twin.get_yticklabels():
            label.set_bbox(ground)
            label.set_fontsize(9)
    return fig


def _short(label: str, width: int = 22) -> str:
    """An axis label short enough to stand beside its neighbours."""
    return label if len(label) <= width else label[: width - 1] + "…"


def write_report(study, summary: Summary, curves, labels, folder: Path) -> list[Path]:
    """PNG plots and a report.md that reads on its own; returns report.md first, then plots."""
    import matplotlib

    matplotlib.use("Agg")
    import optuna.visualization.matplotlib as ovm

    folder.mkdir(parents=True, exist_ok=True)
    metric = _metric(summary)
    ranked = {name: importances(study, evaluator=name) for name in EVALUATORS}
    kept = {t.number: t.attrs.get("best_epoch") for t in summary.trials}
    made = {
        "history": history_figure(study, summary),
        "importances": figures.importances_figure(ranked, metric, MEASURES),
        "parallel": parallel_figure(study, summary, ranked["fANOVA"]),
        "curves": figures.curves_figure(curves, labels, kept) if curves else None,
        "pareto": (
            _figure(_quiet(ovm.plot_pareto_front, study, target_names=list(summary.objectives)))
            if summary.pareto
            else None
        ),
        "labels_curve": figures.labels_curve_figure(seed_groups(summary)),
        "gap_vs_acc": figures.gap_vs_acc_figure(summary) if summary.complete() else None,
    }
    titles = {
        "history": f"Optimization history ({metric})",
        "importances": f"Parameter importances ({' and '.join(EVALUATORS)}, the searched trials)",
        "parallel": "Parallel coordinates (the searched trials, the most important parameters)",
        "curves": "Learning curves of the top trials and the baseline (the kept epoch marked)",
        "pareto": "Pareto front",
        "labels_curve": "Accuracy against labelled images per class",
        "gap_vs_acc": "Overfitting gap against the objective's accuracy, every complete trial",
    }
    plots = {
        titles[k]: _save(fig, folder / f"{k}.png") for k, fig in made.items() if fig is not None
    }
    text = render(summary).split("\nOpen the MLflow UI")[0]
    md = [f"# Study `{summary.study_name}`", "", "```", text.rstrip(), "```", ""]
    if any(ranked.values()):
        md += [f"## Which searched parameters mattered ({' and '.join(EVALUATORS)})", ""]
        for name, values in ranked.items():
            md += [f"{name} importance for {metric}:", ""]
            md += [f"- `{k}`: {v:.3f}" for k, v in values.items()] or ["- (too few trials)"]
            md += [""]
        md += [DISAGREE, ""]
    for title, path in plots.items():
        md += [f"## {title}", "", f"![{title}]({path.name})", ""]
    report = folder / "report.md"
    report.write_text("\n".join(md))
    return [report, *plots.values()]
