"""After a study: the held-out test split (once per chosen trial), the best model in the
registry, re-runs over more seeds, and the written report. `run_study.py report` and the end of
every study come here; the study loop itself is in `harness.study.search`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import optuna

from harness.config.metrics import KINDS, best_name
from harness.config.spec import safe_name
from harness.config.tags import Tag
from harness.core import checkpoints, tasks
from harness.core.shared import seed_everything
from harness.data import datacache
from harness.reports import classical, plots, report
from harness.reports.ablation import ablate_study
from harness.tracking import registry, runs, ui
from harness.tracking import store as tracking
from harness.tracking.runs import Resources, StudyOptions, load_config


def trained_model(client, results: Path, name: str, number: int, run_id: str):
    """(config, data, model with the trial's best weights) of a complete trial, from the
    results folder's best-weights file or the run's logged copy; None when neither is kept."""
    path = checkpoints.best_weights_path(results, name, number)
    if not path.is_file():
        path = registry.download_checkpoint(client, run_id, results / "downloads" / run_id)
    if path is None:
        return None
    config = load_config(run_id)
    data = tasks.load_data(config, datacache.under(results))
    model = tasks.build(config, data, None, load_weights=False)  # the checkpoint comes next
    model.load_state_dict(checkpoints.load_weights(path))
    model.eval()
    return config, data, model


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
    registry.register_model(client, safe_name(name), run_id, model, x[:2].cpu().numpy(), metrics)


def test_once(client, results: Path, name: str, trial) -> dict[str, float] | None:
    """The chosen trial's model on the held-out test data: evaluated once, stored on its run,
    and read back from there afterwards. Fine-tuning and multi-task trials: the test split
    (`test_acc`, `test_loss`); meta-learning trials: episodes of the meta-test classes at each
    shot count of `meta.test_shots` (`meta_test_acc_Kshot`, `meta_test_ci95_Kshot`)."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    run = client.get_run(run_id)
    config = load_config(run_id)
    meta = config.task.kind == "meta"
    keys = (
        [f"meta_test_{m}_{k}shot" for k in config.meta.test_shots for m in ("acc", "ci95")]
        if meta
        else ["test_acc", "test_loss"]
    )
    if all(k in run.data.metrics for k in keys):
        return {k: run.data.metrics[k] for k in keys}
    trained = trained_model(client, results, name, trial.number, run_id)
    if trained is None:
        return None
    config, data, model = trained
    metrics = tasks.test_metrics(config, model, data)
    tracking.log_metrics_once(client, run_id, metrics)
    return metrics


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
) -> report.Summary:
    """Test the best trial and the baseline (once), register the best model, write the report
    (plots and report.md under RESULTS/reports/STUDY/, also logged to the study's parent run).
    `ablate`: the ablation of the best trial over `seeds` seeds (3 by default) instead of the
    seed re-runs (its best and baseline variants are those)."""
    summary = summarize(study, opts, name)
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
    test = {}
    for row in chosen:
        metrics = test_once(client, opts.results, name, frozen[row.number])
        if metrics:
            test[row.number] = metrics
    if complete and complete[0].number in test:
        best = complete[0]
        acc = report.headline(best.attrs)[0]
        metrics = {acc: best.attrs[acc], **test[best.number]}
        register(client, opts.results, name, best, metrics)
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
    objective = summary.objectives[0] if summary.objectives else "val_acc"
    url = (
        ui.experiment_url("http://127.0.0.1:5000", exp.experiment_id, objective, summary.direction)
        if exp
        else ""
    )
    summary = dataclasses.replace(
        summary,
        test=test,
        seeds=seeded,
        ui_url=url,
        classical=references,
        ablation=ablation.table() if ablation else "",
    )
    folder = opts.results / "reports" / safe_name(name)
    files = plots.write_report(study, summary, curves, labels, folder)
    if ablation is not None:
        files += ablation.add_to_report(files[0])
    parent = study.user_attrs.get("mlflow_parent_run_id")
    if parent:
        tracking.log_report(client, parent, files)
        refs = {r.metric: r.test_acc for r in references}
        tracking.log_metrics_once(client, parent, summary.study_metrics() | refs)
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
        for t in study.get_trials(deepcopy=False)
    ]
    multi = len(study.directions) > 1
    pareto = {t.number for t in study.best_trials} if multi else set()
    return report.Summary(
        name,
        study.directions[0].name.lower(),
        rows,
        opts,
        pareto=pareto,
        objectives=tuple(study.user_attrs.get(Tag.OBJECTIVES, ())),
    )
