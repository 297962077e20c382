"""The MLflow UI: the command that serves a results folder's store, and the links the harness
prints (the study's runs in the training view, sorted by the objective)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from harness.config.metrics import PRUNED_AT, best_name
from harness.config.tags import Tag
from harness.tracking.store import connect, is_local_store

# MLflow 3.17's UI opens an experiment in its GenAI view unless the URL says otherwise (a browser
# setting, local storage mlflow.workflowType, default GenAI): `workflowType=machine_learning` on
# the experiment's `/runs` page lands on the runs table; its search and sort come from the query
# too (the bare experiment page drops them).
RUNS_VIEW = "workflowType=machine_learning"
UI_APP = "harness-ui"  # MLflow's app with the training view as default (tracking/ui_app.py)


TRIAL_RUNS = "attributes.run_name LIKE 'trial-%'"


def view_key(study_name: str) -> str:
    return "harness-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in study_name)


def save_study_view(
    client, exp_id: str, study_name: str, objective: str, searched: list[str]
) -> str:
    """The study's own runs table as a shared view of its experiment: its trial runs only
    (by the study's tag: two studies of one file share the experiment), in `rank` order, with
    the numbers first: the objective at the kept epoch, best_overfit_gap, test_acc, the trial's
    state and pruned epoch, rank, then the searched parameters. Returns the view's key."""
    import json

    columns = [
        f"metrics.`{best_name(objective)}`",
        "metrics.`best_overfit_gap`",
        "metrics.`test_acc`",
        f"metrics.`{PRUNED_AT}`",  # a number only on pruned trials: they stand out
        "metrics.`rank`",
        f"tags.`{Tag.OPTUNA_STATE}`",
        *(f"params.`{p}`" for p in searched),
    ]
    state = {
        "searchFilter": f"tags.`{Tag.OPTUNA_STUDY}` = '{study_name}' and {TRIAL_RUNS}",
        "orderByKey": "metrics.`rank`",
        "orderByAsc": True,
        "selectedColumns": columns,
    }
    key = view_key(study_name)  # MLflow has no Python API for a view: the tag its UI reads
    client.set_experiment_tag(exp_id, Tag.SHARED_VIEW + key, json.dumps(state))
    return key


def study_link(exp_id: str, key: str) -> str:
    """The study's saved view of its experiment's runs table, in the training view, relative
    like `run_link`."""
    return f"#/experiments/{exp_id}/runs?{RUNS_VIEW}&viewStateShareKey={key}"


def study_url(base: str, exp_id: str, key: str) -> str:
    """`study_link` at the UI's address `base`."""
    return f"{base.rstrip('/')}/{study_link(exp_id, key)}"


def run_link(exp_id: str, run_id: str) -> str:
    """A run's page in the training view, relative to the UI's own address (for descriptions,
    which the UI renders as Markdown: the link works on any host and port)."""
    return f"#/experiments/{exp_id}/runs/{run_id}?{RUNS_VIEW}"


def model_link(name: str) -> str:
    """A registered model's page in the training view, relative like `run_link`."""
    from urllib.parse import quote

    return f"#/models/{quote(name)}?{RUNS_VIEW}"


def study_description(
    name: str, exp_id: str, key: str, best: tuple[int, str] | None, model: str | None
) -> str:
    """The study's parent run description: links to its trials (its saved view), its best
    trial (number, run id) and its registered model, each in the training view."""
    lines = [f"Optuna study **{name}**: [its trial runs, best first]({study_link(exp_id, key)})."]
    if best is not None:
        lines.append(f"Best trial: [trial-{best[0]}]({run_link(exp_id, best[1])}).")
    if model is not None:
        lines.append(f"Registered model: [{model}]({model_link(model)}).")
    lines.append("The report: Artifacts, report/report.md.")
    return "\n\n".join(lines)


def experiment_url(base: str, exp_id: str) -> str:
    """The UI page of an experiment's trial runs, in the order of their `rank` metric (the
    study's ranking, ties broken by `metrics.TIE_RULE`; logged when the study reports)."""
    from urllib.parse import quote

    query = [
        RUNS_VIEW,
        f"searchFilter={quote(TRIAL_RUNS)}",
        f"orderByKey={quote('metrics.`rank`')}",
        "orderByAsc=true",
    ]
    return f"{base.rstrip('/')}/#/experiments/{exp_id}/runs?{'&'.join(query)}"


def study_urls(tracking_uri: str, base: str) -> list[tuple[str, str]]:
    """(study name, trial-runs URL) of every study (parent run) in the store."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[10:]).is_file():
        return []
    client = connect(tracking_uri)
    out = []
    for e in client.search_experiments():
        for parent in client.search_runs([e.experiment_id], f"tags.`{Tag.ROLE}` = 'study'"):
            name = parent.info.run_name
            key = view_key(name)
            if Tag.SHARED_VIEW + key in e.tags:
                out.append((name, study_url(base, e.experiment_id, key)))
            else:  # a study that has not reported yet
                out.append((name, experiment_url(base, e.experiment_id)))
    return out


def ui_env() -> dict[str, str]:
    """The UI server's environment: MLflow 3's job runner (a pool of huey consumers for GenAI
    jobs) is turned off: the harness has no such jobs and it would crowd a small machine."""
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def ui_command(tracking_uri: str, results: Path, host: str, port: int) -> list[str]:
    """`mlflow server` on the study's store: loopback by default, one worker, middleware on."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri]
    cmd += ["--host", host, "--port", str(port), "--workers", "1", "--app-name", UI_APP]
    if is_local_store(tracking_uri):
        cmd += ["--default-artifact-root", (results / "mlartifacts").resolve().as_uri()]
    return cmd
