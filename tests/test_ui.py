"""The MLflow UI on a study's stores: REST API reads back the study, a browser renders it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import QUICKSTART, REPO, TINY, free_port, run_cli

from harness.config.load import load_spec
from harness.study.search import StudyOptions, run_study

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _get(url: str, body: dict | None = None, timeout: float = 5) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        text = resp.read().decode()
    return json.loads(text) if text.strip().startswith("{") else {"text": text}


def _quickstart_runs(base: str) -> tuple[str, list[dict]]:
    """The quickstart experiment's id and its runs, over the UI server's REST API."""
    exps = _get(f"{base}/api/2.0/mlflow/experiments/search", {"max_results": 10})
    exp_id = next(e for e in exps["experiments"] if e["name"] == "quickstart")["experiment_id"]
    body = {"experiment_ids": [exp_id], "max_results": 100}
    return exp_id, _get(f"{base}/api/2.0/mlflow/runs/search", body)["runs"]


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory):
    """A 2-trial study and `run_study.py ui` serving it on a free port; stopped afterwards."""
    results = tmp_path_factory.mktemp("ui") / "results"
    spec = load_spec(QUICKSTART, TINY)
    run_study(spec, StudyOptions(results=results, n_trials=2, quiet=True))
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "run_study.py"),
            "ui",
            "--results",
            str(results),
            "--port",
            str(port),
        ],
        cwd=results.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the server and its workers
    )
    base = f"http://127.0.0.1:{port}"
    printed = [proc.stdout.readline() for _ in range(3)]  # before the server starts
    assert printed[2].strip() == f"server log: {results / 'logs' / 'mlflow-ui.log'}"
    study_url = printed[1].split("quickstart: ", 1)[1].strip()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if _get(f"{base}/health")["text"].strip() == "OK":
                break
        except OSError:
            time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the UI did not answer /health: {proc.stdout.read()[-2000:]}")
    yield base, results, study_url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    rest = proc.stdout.read()  # the server's INFO lines and warnings went to its log
    assert "INFO" not in rest and "Warning" not in rest, rest[-2000:]
    assert "Uvicorn running on" in (results / "logs" / "mlflow-ui.log").read_text()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # no worker of the server is left behind
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.3)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the UI server left processes behind after SIGTERM")


def test_ui_serves_the_study_over_rest(ui_server):
    base, _, _ = ui_server
    exps = _get(f"{base}/api/2.0/mlflow/experiments/search", {"max_results": 10})
    exp = next(e for e in exps["experiments"] if e["name"] == "quickstart")
    runs = _get(
        f"{base}/api/2.0/mlflow/runs/search",
        {"experiment_ids": [exp["experiment_id"]], "max_results": 100},
    )["runs"]
    trials = [r for r in runs if any(t["key"] == "optuna.trial_number" for t in r["data"]["tags"])]
    assert len(trials) == 2
    assert all(r["info"]["status"] == "FINISHED" for r in trials)
    metrics = {m["key"] for m in trials[0]["data"]["metrics"]}
    assert {"val_acc", "train_acc", "overfit_gap", "overfit_gap_loss", "lr"} <= metrics


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def _chromium(results, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            CHROMIUM,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={results / 'chromium-profile'}",
            "--window-size=1600,900",
            "--virtual-time-budget=20000",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_the_printed_url_lands_on_the_trial_runs_ranked_by_the_objective(ui_server):
    """MLflow 3.17 opens an experiment in its GenAI view; the URL `ui` prints lands on the
    runs table, the trial runs in the order of their `rank` metric (the study's ranking)."""
    base, results, url = ui_server
    assert url.startswith(f"{base}/#/experiments/") and "workflowType=machine_learning" in url
    dom = _chromium(results, "--dump-dom", url).stdout
    assert "trial-0" in dom and "trial-1" in dom
    assert 'aria-label="Sort: rank"' in dom
    assert "viewStateShareKey=harness-quickstart" in url  # the study's own saved view
    assert "best_val_acc" in dom and "best_overfit_gap" in dom  # the numbers, first screen
    import json

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name("quickstart")
    view = json.loads(exp.tags["mlflow.sharedViewState.harness-quickstart"])
    assert view["searchFilter"].startswith("tags.`optuna.study` = 'quickstart'")  # not run names
    assert view["selectedColumns"][0] == "metrics.`best_val_acc`"
    assert "<strong>2</strong> matching runs" in dom  # the two trials, not the GenAI overview
    shot = results / "screenshots" / "landing.png"
    shot.parent.mkdir(exist_ok=True)
    _chromium(results, f"--screenshot={shot}", url)
    assert shot.is_file() and shot.stat().st_size > 20_000


def test_ui_on_a_taken_port_exits_2_with_a_sentence(ui_server, tmp_path):
    base, results, _ = ui_server
    port = base.rsplit(":", 1)[1]
    out = run_cli("ui", "--results", str(results), "--port", port, cwd=tmp_path, timeout=60)
    assert out.returncode == 2
    assert f"--port {port}: 127.0.0.1:{port} is not free" in out.stderr
    assert out.stderr.strip().endswith("give another --port.")
    assert "MLflow UI on" not in out.stdout  # nothing claims a UI that is not there


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_ui_pages_render_in_a_browser(ui_server):
    base, results, _ = ui_server
    exp_id, runs = _quickstart_runs(base)
    ids = [r["info"]["run_id"] for r in runs if r["info"]["run_name"].startswith("trial-")]
    compare = f'{base}/#/compare-runs?runs={json.dumps(ids[:2])}&experiments=["{exp_id}"]'
    pages = {"experiment": f"{base}/#/experiments/{exp_id}", "compare": compare}
    shots = results / "screenshots"
    shots.mkdir(exist_ok=True)
    for name, url in pages.items():
        path = shots / f"{name}.png"
        _chromium(results, f"--screenshot={path}", url)
        assert path.is_file() and path.stat().st_size > 20_000, f"no screenshot of {name}"
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_pages_opened_from_links_stay_in_the_training_view(ui_server):
    """MLflow's own links (the parent run, a trial, the registry) carry no view; `ui` serves
    its landing page with the training view, a closed Assistant panel and no registry pop-up
    as a new browser's defaults. The parent run's description links the study's view, its
    best trial and its registered model, each in the training view."""
    base, results, _ = ui_server
    exp_id, runs = _quickstart_runs(base)
    tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"]["tags"]} for r in runs}
    parent = next(i for i, t in tags.items() if t.get("harness.role") == "study")
    trial = next(i for i, t in tags.items() if "optuna.trial_number" in t)
    description = tags[parent]["mlflow.note.content"]
    assert f"#/experiments/{exp_id}/runs?workflowType=machine_learning&viewStateShareKey=" in (
        description
    )
    assert "#/models/quickstart?workflowType=machine_learning" in description
    pages = {
        "parent": f"{base}/#/experiments/{exp_id}/runs/{parent}",
        "trial": f"{base}/#/experiments/{exp_id}/runs/{trial}",
        "registry": f"{base}/#/models",
    }
    for name, url in pages.items():
        profile = results / f"chromium-fresh-{name}"  # a browser that never chose a view
        dom = _chromium(profile, "--dump-dom", url).stdout
        assert "Model registry" in dom, f"{name}: no training-view sidebar"
        assert "Judges" not in dom and "Evaluation runs" not in dom, f"{name}: the GenAI view"
        assert "Ask a question" not in dom, f"{name}: the Assistant panel is open"
        assert "Flexible, governed deployments" not in dom, f"{name}: the registry pop-up"
        if name == "parent":  # the description, rendered: its links keep the view
            assert "runs?workflowType=machine_learning&amp;viewStateShareKey=" in dom
            assert 'href="#/models/quickstart?workflowType=machine_learning"' in dom
