"""The report's plots read at first sight: axes named after the objective, parallel
coordinates over the parameters that matter, the kept epoch marked on the learning curves,
and two importance evaluators named (on an in-memory study with fake curves: no training)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import matplotlib
import numpy as np
import optuna
import pytest

from harness.config.tags import Tag
from harness.reports import figures, plots
from harness.study.finish import summarize

matplotlib.use("Agg")

N_PARAMS = 9  # more than plots.PARALLEL_AXES


def _study(objectives=("val_acc",)):
    """A baseline (no sampled values) and 20 searched trials whose val_acc is mostly p0's."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    study = optuna.create_study(directions=["maximize"] * len(objectives))
    study.set_user_attr(Tag.OBJECTIVES, list(objectives))
    dists = {f"group.p{i}": FloatDistribution(0.0, 1.0) for i in range(N_PARAMS - 1)}
    dists["group.a_rather_long_parameter_name"] = CategoricalDistribution(["none", "crop"])
    rng = np.random.default_rng(0)

    def attrs(acc, epoch):
        return {"val_acc": acc, "overfit_gap": 0.1, "best_epoch": epoch, "mlflow_run_id": "r"}

    study.add_trial(
        optuna.trial.create_trial(
            values=[0.5] * len(objectives), user_attrs={Tag.BASELINE: True, **attrs(0.5, 4)}
        )
    )
    for n in range(20):
        params = {k: float(rng.uniform()) for k in dists if k.startswith("group.p")}
        params["group.a_rather_long_parameter_name"] = ["none", "crop"][n % 2]
        acc = 0.4 + 0.5 * params["group.p0"] + 0.01 * rng.uniform()
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions=dists,
                values=[acc] * len(objectives),
                user_attrs=attrs(acc, 1 + n % 5),
            )
        )
    opts = SimpleNamespace(results="results", tracking_uri=None)
    return study, summarize(study, opts, "plots-test")


def _curves(summary):
    shown = summary.complete()[:2]
    curves = {
        t.number: {"train_acc": [0.5, 0.7, 0.9, 0.95, 0.99], "val_acc": [0.4, 0.6, 0.7, 0.65, 0.6]}
        for t in shown
    }
    return curves, {t.number: f"trial {t.number}" for t in shown}


def test_history_y_axis_is_the_objective():
    study, summary = _study()
    fig = plots.history_figure(study, summary)
    assert fig.axes[0].get_ylabel() == "val_acc"
    assert "Objective Value" not in {ax.get_ylabel() for ax in fig.axes}
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["val_acc of a complete trial", "best val_acc so far"]


def test_history_of_several_objectives_names_the_first():
    study, summary = _study(("val_acc", "val_loss"))
    assert plots.history_figure(study, summary).axes[0].get_ylabel() == "val_acc"


def test_parallel_shows_the_most_important_parameters_and_the_objective():
    study, summary = _study()
    ranked = plots.importances(study)
    assert next(iter(ranked)) == "group.p0"  # the parameter the objective follows
    fig = plots.parallel_figure(study, summary, ranked)
    names = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert len(names) == plots.PARALLEL_AXES + 1  # the objective and the top parameters
    assert names[0] == "val_acc" and "group.p0" in names
    assert all(len(n) <= 22 for n in names)
    # without importances: the first PARALLEL_AXES parameters by name
    fig = plots.parallel_figure(study, summary, {})
    assert len(fig.axes[0].get_xticklabels()) == plots.PARALLEL_AXES + 1


def test_curves_mark_the_kept_epoch():
    _, summary = _study()
    curves, labels = _curves(summary)
    kept = {t.number: t.attrs["best_epoch"] for t in summary.trials}
    fig = figures.curves_figure(curves, labels, kept)
    for ax, number in zip(fig.axes, curves, strict=True):
        epoch = kept[number]
        (dot,) = [ln for ln in ax.get_lines() if ln.get_label() == figures.KEPT]
        assert dot.get_marker() == "o"
        assert dot.get_xydata().tolist() == [[epoch, curves[number]["val_acc"][epoch - 1]]]
        vertical = [ln for ln in ax.get_lines() if set(ln.get_xdata()) == {epoch} and ln is not dot]
        assert len(vertical) == 1 and vertical[0].get_linestyle() == ":"
        assert f"kept epoch {epoch}" in ax.get_title()
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert figures.KEPT in legend


@pytest.mark.parametrize("evaluator", plots.EVALUATORS)
def test_each_evaluator_ranks_the_parameter_that_matters_first(evaluator):
    study, _ = _study()
    ranked = plots.importances(study, evaluator=evaluator)
    assert next(iter(ranked)) == "group.p0"
    assert math.isclose(sum(ranked.values()), 1.0, abs_tol=1e-6)


def test_importances_figure_has_a_panel_per_evaluator():
    study, _ = _study()
    ranked = {name: plots.importances(study, evaluator=name) for name in plots.EVALUATORS}
    fig = figures.importances_figure(ranked, "val_acc", plots.MEASURES)
    titles = [ax.get_title().splitlines()[0] for ax in fig.axes]
    assert titles == [f"{n} importance" for n in plots.EVALUATORS]
    assert figures.importances_figure({"fANOVA": {}}, "val_acc") is None


def test_report_names_both_evaluators_and_writes_the_plots(tmp_path):
    study, summary = _study()
    curves, labels = _curves(summary)
    files = plots.write_report(study, summary, curves, labels, tmp_path)
    md = files[0].read_text()
    assert "## Which searched parameters mattered (fANOVA and PED-ANOVA)" in md
    assert "fANOVA importance for val_acc:" in md and "PED-ANOVA importance for val_acc:" in md
    assert plots.DISAGREE in md
    names = {p.name for p in files[1:]}
    assert {"history.png", "importances.png", "parallel.png", "curves.png"} <= names
    assert "Optimization history (val_acc)" in md


def test_parallel_of_several_maximized_objectives_keeps_dark_for_the_best():
    study, summary = _study(("val_acc", "val_loss"))
    fig = plots.parallel_figure(study, summary, plots.importances(study))
    assert [c.get_cmap().name for c in fig.axes[0].collections] == ["Blues"]
