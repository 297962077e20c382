"""`report STUDY --compare OTHER [OTHER...]`: several studies in one report. Every study is
opened read-only first (an unknown study or a storage that cannot be opened: SpecError, nothing
created); each one's records are read, never written (its chosen models' test numbers are those
its own report measured); the comparison is written to RESULTS/reports/compare-<names>/ and
logged as a run of the MLflow experiment `compare` with a tag per compared study's parent run.
The table and the statistics are `harness.reports.compare`'s.
"""

from __future__ import annotations

import numpy as np
import yaml

from harness.config.metrics import KINDS
from harness.config.spec import SpecError, safe_name
from harness.config.tags import Tag
from harness.reports import compare, report
from harness.study import warm
from harness.study.finish import summarize
from harness.tracking import relocation
from harness.tracking import store as tracking
from harness.tracking.runs import StudyOptions

EXPERIMENT = "compare"  # the MLflow experiment of the comparisons


def _metrics(client, run_id: str | None) -> dict[str, float]:
    return dict(client.get_run(run_id).data.metrics) if run_id else {}


def _classical(parent: dict[str, float]) -> tuple[str, float | None, float | None] | None:
    """The study's classical reference from its parent run: the one best on val where the val
    accuracies were recorded, else the best recorded alone."""
    tests = {
        k.removesuffix("_test_acc"): v
        for k, v in parent.items()
        if k.startswith("classical_") and k.endswith("_test_acc")
    }
    if not tests:
        return None
    vals = {k: parent.get(f"{k}_val_acc") for k in tests}
    known = {k: v for k, v in vals.items() if v is not None}
    name = max(known, key=known.get) if known else sorted(tests)[0]
    return f"classical: {name.removeprefix('classical_')}", vals.get(name), tests[name]


def _space(parent_params: dict[str, str]) -> dict[str, str]:
    text = parent_params.get("search.space")
    tree = yaml.safe_load(text) if text else {}
    out = {}
    for key, p in (tree or {}).items():
        kind = next((k for k in ("float", "int", "categorical") if p.get(k) is not None), "")
        words = [kind, str(p.get(kind))] + ["log"] * bool(p.get("log"))
        words += [f"step {p['step']}"] * (p.get("step") is not None)
        words += [f"when {p['when']}"] * bool(p.get("when"))
        out[key] = " ".join(words)
    return out


def record(source: warm.Source, study, opts: StudyOptions) -> compare.StudyRecord:
    """One study's side of the comparison, read from its Optuna study and MLflow store."""
    client = tracking.connect(source.tracking_uri)
    summary = summarize(study, opts, source.name)
    complete, base = summary.complete(), summary.baseline()
    kind = study.user_attrs.get(Tag.TASK_KIND) or "finetune"
    objective = summary.objectives[0] if summary.objectives else KINDS[kind].headline[0]
    parent_id = study.user_attrs.get("mlflow_parent_run_id")
    parent = client.get_run(parent_id) if parent_id else None
    parent_metrics = dict(parent.data.metrics) if parent else {}
    best = complete[0] if complete else None
    best_run = best.attrs.get("mlflow_run_id") if best else None
    best_data = client.get_run(best_run).data if best_run else None
    best_metrics = dict(best_data.metrics) if best_data else {}
    test_metric = "test_acc"
    if kind == "meta":
        shots = sorted(k for k in best_metrics if k.startswith("meta_test_acc_"))
        test_metric = min(shots, key=lambda k: int(k.split("_")[-1][:-4]), default=test_metric)
    rows, notes = [], list(summary.notes)
    if base is not None:
        m = _metrics(client, base.attrs.get("mlflow_run_id"))
        label = f"baseline (trial {base.number})"
        rows.append((label, base.attrs.get(objective), m.get(test_metric)))
    if best is not None:
        label = f"best trial (trial {best.number})"
        rows.append((label, best.value, best_metrics.get(test_metric)))
        if test_metric not in best_metrics:
            notes.append(f"its best trial is not tested yet: run `report {source.name}` first")
    plan = study.user_attrs.get(Tag.SOUP_PLAN) or {}
    soup = plan.get("kind") if plan.get("kind") not in (None, "none") else None
    for kind_ in [soup] if soup else ["greedy", "uniform"]:
        if f"soup_{kind_}_test_acc" in parent_metrics:
            val = parent_metrics.get(f"soup_{kind_}_{objective}")
            rows.append((f"{kind_} soup", val, parent_metrics[f"soup_{kind_}_test_acc"]))
            break
    ref = _classical(parent_metrics)
    if ref is not None:
        rows.append(ref)
    correct, y, data_hash = None, None, study.user_attrs.get(Tag.DATA_HASH)
    curve = []
    if best_run:
        data_hash = best_data.tags.get(Tag.DATA_HASH, data_hash)
        stored = tracking.load_predictions(best_run)
        if stored is not None:
            correct, y = np.asarray(stored[0]) == np.asarray(stored[1]), tuple(stored[1])
        steps = tracking.metric_steps(client, best_run, [objective]).get(objective, {})
        curve = [v for _, v in sorted(steps.items())]
    own = report.own_trials(study)
    finished = [t for t in own if t.state.name in ("COMPLETE", "PRUNED")]
    finished.sort(key=lambda t: (t.datetime_complete is None, t.datetime_complete, t.number))
    starts = [t.datetime_start for t in finished if t.datetime_start]
    ends = [t.datetime_complete for t in finished if t.datetime_complete]
    seconds = (max(ends) - min(starts)).total_seconds() if starts and ends else None
    first = best or base  # the chosen model's settings (the baseline keeps the recipe's)
    space = _space(parent.data.params if parent else {})
    fixed = {}
    if first is not None and first.attrs.get("mlflow_run_id"):
        params = client.get_run(first.attrs["mlflow_run_id"]).data.params
        fixed = {k: v for k, v in params.items() if k not in space and k != "name"}
    return compare.StudyRecord(
        label=source.label,
        kind=kind,
        objective=objective,
        test_metric=test_metric,
        rows=rows,
        finished=len(finished),
        complete=len(complete),
        seconds=seconds,
        history=[t.values[0] if t.state.name == "COMPLETE" else None for t in finished],
        curve=curve,
        best=f"trial {best.number}" if best else "-",
        data_hash=data_hash,
        correct=correct,
        y=y,
        fixed=fixed,
        space=space,
        notes=tuple(notes),
        maximize=summary.direction == "maximize",
    )


def compare_studies(opts: StudyOptions, names: list[str]) -> tuple[str, list]:
    """The comparison of the studies `names` (the first is the report's STUDY): its text and
    its files (report.md first)."""
    unique = list(dict.fromkeys(n.strip() for n in names))
    if len(unique) < 2:
        raise SpecError(
            f"--compare: give at least one other study than {names[0]} (two studies or more)"
        )
    sources = [warm.parse(n, opts) for n in unique]
    studies = [warm.open_source(s, "--compare") for s in sources]  # all of them, before writing
    moved = relocation.relocate(opts.results, opts.tracking())
    records = [record(s, st, opts) for s, st in zip(sources, studies, strict=True)]
    folder = opts.results / "reports" / ("compare-" + "-".join(safe_name(s.name) for s in sources))
    files = compare.write(records, folder)
    client = tracking.connect(opts.tracking())
    exp_id = tracking.experiment_id(client, EXPERIMENT, opts.results, opts.tracking())
    tags = {Tag.ROLE: "compare"}
    for source, study in zip(sources, studies, strict=True):
        tags[Tag.COMPARED + safe_name(source.label)] = study.user_attrs.get(
            "mlflow_parent_run_id", "-"
        )
    run_id = tracking.create_run(client, exp_id, folder.name, tags, {"studies": ", ".join(unique)})
    tracking.log_report(client, run_id, files)
    tracking.log_metrics_once(client, run_id, compare.metrics(records))
    tracking.end_run(client, run_id)
    text = "\n".join(compare.lines(records))
    text += f"\n\nReport: {files[0]}\nMLflow: run {run_id} of the experiment {EXPERIMENT!r}"
    if moved:
        text = f"note: {moved}.\n{text}"
    return text, files
