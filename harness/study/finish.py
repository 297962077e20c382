"""After a study: the held-out test split (once per chosen trial), the best model in the
registry, re-runs over more seeds, and the written report. `run_study.py report` and the end of
every study come here; the study loop itself is in `harness.study.search`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import optuna

from harness.config.metrics import KINDS, best_name
from harness.config.spec import SpecError, safe_name
from harness.config.tags import Tag
from harness.core import tasks
from harness.core.shared import seed_everything
from harness.reports import classical, comparisons, plots, report
from harness.reports.ablation import ablate_study
from harness.study import retention, soups, warm
from harness.study.kept import trained_model
from harness.tracking import registry, runs, ui
from harness.tracking import store as tracking
from harness.tracking.runs import Resources, StudyOptions, load_config


def register(client, results: Path, name: str, best: report.TrialRow, metrics: dict) -> None:
    """The best trial's model as an MLflow PyTorch model (raw uint8 images in, logits out: its
    preprocessing is part of it), with a signature and an input example from the data,
    registered as a version of the study's model with the alias `best`."""
    run_id = best.attrs["mlflow_run_id"]
    trained = trained_model(client, results, name, best.number, run_id)
    if trained is None:
        return
    config, data, model = trained
    x = data.x if config.task.kind == "meta" else data.x_val
    model.to("cpu")
    example = x[:2].cpu().numpy()
    classes = getattr(data, "classes", None)
    what = f"trial {best.number} of study {name} (the best by the objective)"
    registry.register_model(
        client, safe_name(name), run_id, model, example, metrics, classes=classes, what=what
    )


def test_once(client, results: Path, name: str, trial) -> dict[str, float] | None:
    """The chosen trial's model on the held-out test data: evaluated once, stored on its run
    (with its prediction per test example, for the paired comparisons), and read back from
    there afterwards. Fine-tuning and multi-task trials: the test split (`test_acc`,
    `test_loss`); meta-learning trials: episodes of the meta-test classes at each shot count of
    `meta.test_shots` (`meta_test_acc_Kshot`, `meta_test_ci95_Kshot`)."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    run = client.get_run(run_id)
    config = load_config(run_id)
    meta = config.task.kind == "meta"
    keys = (
        [f"meta_test_{m}_{k}shot" for k in config.meta.test_shots for m in ("acc", "ci95")]
        if meta
        else ["test_acc", "test_loss"]
    )
    stored = {k: run.data.metrics[k] for k in keys if k in run.data.metrics}
    if len(stored) == len(keys) and (meta or tracking.load_predictions(run_id) is not None):
        return stored
    trained = trained_model(client, results, name, trial.number, run_id)
    if trained is None:
        return stored if len(stored) == len(keys) else None
    config, data, model = trained
    if meta:
        metrics = tasks.test_metrics(config, model, data)
    else:  # tested before predictions were stored: the same weights give the same numbers
        metrics, pred = tasks.split_scores(config, model, data, "test")
        tracking.log_predictions(client, run_id, pred.tolist(), data.y_test.cpu().tolist())
    if len(stored) < len(keys):
        tracking.log_metrics_once(client, run_id, metrics)
    return stored if len(stored) == len(keys) else metrics


def seed_reruns(
    res: Resources, parent: str, rows: list[report.TrialRow], n: int
) -> dict[int, dict]:
    """Re-run each row's config over `n` other training seeds (same data split, same starting
    weights), as runs under the study's parent tagged `harness.rerun_of`; runs done earlier are
    reused. Returns {trial: {metric: (mean, std, n)}} for the trial's accuracy and gap
    (val_acc and overfit_gap; meta-learning: meta_val_acc and adaptation_gap)."""
    import statistics

    out = {}
    for row in rows:
        run_id = row.attrs["mlflow_run_id"]
        config = load_config(run_id)
        start, _ = res.pretrained_for(config)
        keys = KINDS[config.task.kind].headline
        done = tracking.finished_reruns(res.client, res.exp_id, run_id, keys)
        values: dict[str, list[float]] = {k: [] for k in keys}
        for seed in range(config.seed + 1, config.seed + n + 1):
            if seed not in done:
                rerun = config.model_copy(
                    update={
                        "seed": seed,
                        "data": config.data.model_copy(update={"split_seed": config.split_seed}),
                    }
                )
                tags = {Tag.RERUN_OF: run_id, Tag.ROLE: "seed_rerun"}
                name = f"trial-{row.number}-seed{seed}"
                logged = runs.retrain(res, parent, name, rerun, start, tags)
                done[seed] = {k: logged[best_name(k)] for k in values}
            for k in values:
                values[k].append(done[seed][k])
        out[row.number] = {
            k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
            for k, v in values.items()
        }
    return out


def finish_report(
    study: optuna.Study,
    opts: StudyOptions,
    name: str,
    client,
    seeds: int = 0,
    ablate: bool = False,
    soup: bool = False,
) -> report.Summary:
    """Test the best trial and the baseline (once), register the best model, make the study's
    soups (`search.soup`, or `soup`: on demand), compare the chosen models pairwise on the test
    split, write the report (plots and report.md under RESULTS/reports/STUDY/, also logged to
    the study's parent run). `ablate`: the ablation of the best trial over `seeds` seeds (3 by
    default) instead of the seed re-runs (its best and baseline variants are those)."""
    summary = summarize(study, opts, name)
    plan = soup_plan(study, soup)
    ablation = None
    if ablate:  # an input error before anything else; trains what earlier calls did not
        ablation = ablate_study(client, opts, summary, study.user_attrs, seeds or 3)
        seeds = 0
    complete = summary.complete()
    chosen = [t for t in (complete[0] if complete else None, summary.baseline()) if t]
    if any("seed" in t.params for t in complete):  # settings x seeds: every one is reported
        chosen += [t for t in complete if t not in chosen]
    chosen += [t for t in report.best_per_algorithm(complete) if t not in chosen]
    frozen = {t.number: t for t in study.get_trials(deepcopy=False)}
    test, predictions = {}, {}
    for row in chosen:
        metrics = test_once(client, opts.results, name, frozen[row.number])
        if metrics:
            test[row.number] = metrics
            stored = tracking.load_predictions(row.attrs["mlflow_run_id"])
            if stored is not None:
                predictions[row.number] = stored
    if complete and complete[0].number in test:
        best = complete[0]
        acc = report.headline(best.attrs)[0]
        metrics = {acc: best.attrs[acc], **test[best.number]}
        register(client, opts.results, name, best, metrics)
    made = soups.Soups()
    if plan is not None:
        objective = summary.objectives[0] if summary.objectives else "val_acc"
        made = soups.make(client, opts.results, study, name, objective, plan)
        retention.after_soup(client, opts.results, study, name, plan)
    shown = [*complete[:3], *(t for t in chosen if t not in complete[:3])]
    curves = {}
    for t in shown:
        keys = KINDS[report.kind_of(t.attrs)].curves
        steps = tracking.metric_steps(client, t.attrs["mlflow_run_id"], list(keys))
        curves[t.number] = {k: [v for _, v in sorted(steps.get(k, {}).items())] for k in keys}
    labels = {t.number: f"trial {t.number}" + (" (baseline)" if t.baseline else "") for t in shown}
    seeded = {}
    if seeds:
        notes = report.Progress(total=0, done=0, quiet=True, bar=False)
        parent = study.user_attrs.get("mlflow_parent_run_id", "")
        exp_id = tracking.experiment_id(
            client, study.user_attrs[Tag.EXPERIMENT], opts.results, opts.tracking()
        )
        seeded = seed_reruns(
            Resources(opts.results, client, exp_id, notes.note), parent, shown, seeds
        )
    references = classical_references(study, opts, client)
    exp = client.get_experiment_by_name(study.user_attrs.get(Tag.EXPERIMENT, name))
    url = ""
    if exp:
        objective = summary.objectives[0] if summary.objectives else "val_acc"
        searched = sorted({k for t in summary.trials for k in t.params})
        key = ui.save_study_view(client, exp.experiment_id, name, objective, searched)
        url = ui.study_url("http://127.0.0.1:5000", exp.experiment_id, key)
        parent = study.user_attrs.get("mlflow_parent_run_id")
        if parent:
            best = complete[0] if complete else None
            described = ui.study_description(
                name,
                exp.experiment_id,
                key,
                (best.number, best.attrs["mlflow_run_id"]) if best else None,
                registry.registered_name(client, safe_name(name)),
            )
            tracking.describe_run(client, parent, described)
    summary = dataclasses.replace(
        summary,
        test=test,
        seeds=seeded,
        ui_url=url,
        classical=references,
        ablation=ablation.table() if ablation else "",
        soups=made,
    )
    summary = dataclasses.replace(summary, comparisons=comparisons.paired(summary, predictions))
    folder = opts.results / "reports" / safe_name(name)
    files = plots.write_report(warm.own_view(study), summary, curves, labels, folder)
    if ablation is not None:
        files += ablation.add_to_report(files[0])
    parent = study.user_attrs.get("mlflow_parent_run_id")
    if parent:
        tracking.log_report(client, parent, files)
        refs = {r.metric: r.test_acc for r in references}  # and their val: `report --compare`
        refs |= {r.metric.removesuffix("_test_acc") + "_val_acc": r.val_acc for r in references}
        fresh = any(not s.reused for s in made.soups)  # reused soups cost nothing new
        made_in = {"soup_seconds": made.seconds} if fresh else {}
        extra = refs | comparisons.metrics(summary) | made_in
        tracking.log_metrics_once(client, parent, summary.study_metrics() | extra)
    for rank, t in enumerate(summary.complete(), 1):  # the MLflow table sorts by it
        tracking.log_metrics_once(client, t.attrs["mlflow_run_id"], {"rank": rank})
    return dataclasses.replace(summary, files=files)


def classical_references(study: optuna.Study, opts: StudyOptions, client) -> list:
    """The classical reference on the study's split (harness.reports.classical): fine-tuning and
    multi-task studies, on the first trial's data and, where it starts from pretrained
    weights, their frozen features. [] for meta-learning."""
    first = next(
        (t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("mlflow_run_id")), None
    )
    if first is None:
        return []
    config = load_config(first.user_attrs["mlflow_run_id"])
    if config.task.kind == "meta":
        return []
    exp_id = client.get_run(first.user_attrs["mlflow_run_id"]).info.experiment_id
    res = Resources(opts.results, client, exp_id, note=lambda _: None)
    data = res.data_for(config)
    start, _ = res.pretrained_for(config)
    model = None
    if config.model.pretrained_kind != "none":
        seed_everything(config.seed)
        model = tasks.build(config, data, start)
        model.to("cpu")
    kind = config.model.pretrained_kind
    start = {"source": "the source model", "imagenet": f"{config.model.arch} ImageNet weights"}
    return classical.references(data, config.seed, model, start.get(kind, "the starting weights"))


def soup_plan(study: optuna.Study, asked: bool) -> dict | None:
    """The study's soup plan ({"kind", "candidates"}), or None: none planned (`search.soup:
    none`, or a study made before soups) and none asked for. `asked` (`report --soup`) on a
    meta-learning or multi-objective study is an input error."""
    plan = study.user_attrs.get(Tag.SOUP_PLAN)
    if asked:
        if study.user_attrs.get(Tag.TASK_KIND) == "meta":
            raise SpecError(
                "--soup: a meta-learning study has no soup (its trials' weights are "
                "initializations, not fine-tuned models to average)"
            )
        if len(study.directions) > 1:
            raise SpecError("--soup: a soup is chosen by one val objective, not several")
        kind = plan["kind"] if plan and plan["kind"] != "none" else "greedy"
        return {"kind": kind, "candidates": (plan or {}).get("candidates", 10)}
    return plan if plan and plan["kind"] != "none" else None


def summarize(study: optuna.Study, opts: StudyOptions, name: str) -> report.Summary:
    rows = [
        report.TrialRow(
            number=t.number,
            state=t.state.name,
            value=t.values[0] if t.values else None,
            baseline=bool(t.user_attrs.get(Tag.BASELINE)),
            params=dict(t.params),
            attrs=dict(t.user_attrs),
        )
        for t in report.own_trials(study)  # a warm start's trials are not the study's
    ]
    multi = len(study.directions) > 1
    complete = [t for t in report.own_trials(study) if t.state.name == "COMPLETE"]
    pareto = {t.number for t in report.pareto_front(complete, study.directions)} if multi else set()
    notes = []
    sources = study.user_attrs.get(Tag.WARM_START_FROM) or []
    if sources:
        notes.append(
            f"Warm-started from {warm.named(sources)}: handed to the sampler, not counted or "
            "reported here."
        )
        notes += warm.data_notes(sources, study.user_attrs.get(Tag.DATA_HASH))
    return report.Summary(
        name,
        study.directions[0].name.lower(),
        rows,
        opts,
        pareto=pareto,
        objectives=tuple(study.user_attrs.get(Tag.OBJECTIVES, ())),
        notes=tuple(notes),
    )
