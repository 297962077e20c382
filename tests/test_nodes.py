"""A trial survives its node: two "nodes" (two results folders on this machine) share a scratch
PostgreSQL database (Optuna), one MLflow tracking server and its artifact store. Node A is
stopped mid-trial (SIGTERM: a preemption notice; kill -9: a dead node) and its results folder
deleted; node B retries the trial from A's last state in the shared store. A corrupt or
mismatched shared state restarts the trial from epoch 1, with a note. A tracking server with
MLflow's basic-auth app: the right login runs a study, a wrong one exits 2 at once, and the
credentials appear nowhere. Run where HARNESS_TEST_PG is set (.ci/run starts PostgreSQL)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import torch
from conftest import QUICKSTART, REPO, free_port, hold_env, start_mlflow_server, wait_held
from mlflow import MlflowClient

from harness.study.search import open_storage

pytestmark = pytest.mark.slow
PG = os.environ.get("HARNESS_TEST_PG")  # e.g. postgresql://harness:harness@127.0.0.1/postgres
TRIALS = [  # 5 epochs of about 0.2 s: a state written (and uploaded) after every epoch
    "model.pretrained=none",
    "train.epochs=5",
    "data.shots_per_class=60",
    "search.pruner=none",
    "search.flush_seconds=0",
]
USER, PASSWORD = "study-user-k2w", "Xq7-node-pa55word-9Z"  # the login test's credentials


def _database() -> str:
    import psycopg

    name = f"harness_nodes_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{PG.rsplit('/', 1)[0]}/{name}"


@pytest.fixture
def stores(tmp_path):
    """A fresh Optuna database and a tracking server (on its own database) with its artifact
    store; (storage URL, tracking URI, artifacts folder)."""
    if not PG:
        pytest.skip("HARNESS_TEST_PG is not set (.ci/run starts PostgreSQL and sets it)")
    artifacts = tmp_path / "artifacts"
    port = free_port()
    server = start_mlflow_server(_database(), artifacts, port)
    yield _database(), f"http://127.0.0.1:{port}", artifacts
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


def _args(node: Path, storage: str, uri: str, n_trials: int = 1, *extra: str) -> list[str]:
    args = [sys.executable, str(REPO / "run_study.py"), str(QUICKSTART), "--results", str(node)]
    args += ["--storage", storage, "--tracking-uri", uri, "--n-trials", str(n_trials), "--quiet"]
    for s in TRIALS:
        args += ["--set", s]
    return [*args, *extra]


def _node_a(tmp_path, storage, uri, env_extra=None, *extra) -> tuple[subprocess.Popen, dict]:
    """Node A, its first trial held after its third epoch's state is written (tests/hold)."""
    hold = tmp_path / "hold"
    env = {**hold_env(hold, epoch=3), **(env_extra or {})}
    proc = subprocess.Popen(
        _args(tmp_path / "node-a", storage, uri, 1, *extra),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    (held,) = wait_held(hold, [proc])
    assert held["epoch"] == 3
    return proc, held


def _preempt(tmp_path, storage, uri, sig=signal.SIGTERM) -> dict:
    """SIGTERM (or `sig`) node A after its third epoch; its results folder deleted; the held
    marker."""
    proc, held = _node_a(tmp_path, storage, uri)
    proc.send_signal(sig)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out[-3000:]
    shutil.rmtree(tmp_path / "node-a")
    return held


def _node_b(tmp_path, storage, uri, *extra) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        _args(tmp_path / "node-b", storage, uri, 1, *extra),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _attempts(storage: str, uri: str):
    """(the first attempt's trial and run, the retry's trial and run)."""
    trials = optuna.load_study(study_name="quickstart", storage=open_storage(storage)).trials
    client = MlflowClient(uri)
    first = trials[0]
    (retry,) = [t for t in trials if t.user_attrs.get("harness.retry_of") == 0]
    assert first.state.name == "FAIL" and retry.state.name == "COMPLETE"
    runs = [client.get_run(t.user_attrs["mlflow_run_id"]) for t in (first, retry)]
    return first, runs[0], retry, runs[1], client


def _states_left(artifacts: Path) -> list[Path]:
    return [p for p in artifacts.rglob("*") if p.is_file() and p.parent.name == "resume"]


def _steps(client, run) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_acc"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_preempted_trial_resumes_on_another_node_from_the_shared_state(tmp_path, stores, sig):
    storage, uri, artifacts = stores
    held = _preempt(tmp_path, storage, uri, sig)
    _node_b(tmp_path, storage, uri)
    first, dead, retry, again, client = _attempts(storage, uri)
    assert held["trial"] == first.number
    assert dead.info.status == "KILLED" and dead.data.tags["harness.fault"] == "interrupted"
    assert dead.data.metrics["state_uploads"] >= 1 and dead.data.metrics["state_upload_mb"] > 0
    assert again.data.tags["harness.resumed_from_epoch"] == "3"  # A's last saved epoch
    assert "the shared state of trial 0" in again.data.tags["harness.resume"]
    assert _steps(client, again) == [4, 5]  # its curve continues from there
    assert _states_left(artifacts) == []  # retention: the trial ended, its states went
    assert not (tmp_path / "node-b" / "resume").exists()


def test_a_dead_node_s_trial_is_retried_from_the_shared_state_after_the_grace(tmp_path, stores):
    storage, uri, _ = stores
    grace = ("--heartbeat-grace", "4")
    node = {"HARNESS_TEST_HOSTNAME": "node-a"}  # another host: no pid to look at, a heartbeat
    proc, held = _node_a(tmp_path, storage, uri, node, *grace)
    proc.kill()  # kill -9: no handler runs, the trial stays RUNNING
    proc.wait(timeout=30)
    shutil.rmtree(tmp_path / "node-a")
    # Optuna's view, as node B will see it: wait until the heartbeat is older than the grace
    beats = optuna.storages.RDBStorage(storage, heartbeat_interval=1, grace_period=4)
    study = optuna.load_study(study_name="quickstart", storage=beats)
    trial_id = study.trials[held["trial"]]._trial_id
    deadline = time.monotonic() + 120
    while trial_id not in beats._get_stale_trial_ids(study._study_id):
        assert time.monotonic() < deadline, "the dead node's trial never went stale"
        time.sleep(0.2)
    assert study.trials[held["trial"]].state.name == "RUNNING"  # nobody has looked yet
    _node_b(tmp_path, storage, uri, *grace)
    first, dead, retry, again, client = _attempts(storage, uri)
    assert dead.info.status == "KILLED" and dead.data.tags["harness.fault"] == "killed"
    assert again.data.tags["harness.resumed_from_epoch"] == "3"
    assert _steps(client, again) == [4, 5]


def _corrupt(path: Path) -> None:
    path.write_bytes(b"not a state" + path.read_bytes()[11:])


def _other_config(path: Path) -> None:
    """The state saved by another config (a learning rate changed), its record rewritten to
    match: whole, but not this trial's."""
    state = torch.load(path, weights_only=True)
    config = json.loads(state["config"])
    config["train"]["lr"] = config["train"]["lr"] * 10
    state["config"] = json.dumps(config, sort_keys=True)
    torch.save(state, path)
    import hashlib

    record = path.with_suffix(".json")
    tree = json.loads(record.read_text())
    tree["bytes"], tree["sha256"] = (
        path.stat().st_size,
        hashlib.sha256(path.read_bytes()).hexdigest(),
    )
    record.write_text(json.dumps(tree))


@pytest.mark.parametrize(
    ("spoil", "said"), [(_corrupt, "corrupt"), (_other_config, "another config")]
)
def test_a_bad_shared_state_restarts_the_trial_from_epoch_1_with_a_note(
    tmp_path, stores, spoil, said
):
    storage, uri, artifacts = stores
    _preempt(tmp_path, storage, uri)
    (state,) = [p for p in _states_left(artifacts) if p.suffix == ".pt"]
    spoil(state)
    _node_b(tmp_path, storage, uri)
    _, _, retry, again, client = _attempts(storage, uri)
    assert "harness.resumed_from_epoch" not in again.data.tags
    note = again.data.tags["harness.resume"]
    assert note.startswith("restarted from epoch 1") and said in note, note
    assert _steps(client, again) == [1, 2, 3, 4, 5]
    assert _states_left(artifacts) == []


@pytest.fixture
def login_stores(tmp_path):
    """Like `stores`, its tracking server behind MLflow's basic-auth app (`--app-name
    basic-auth`, the admin's password from MLFLOW_AUTH_ADMIN_PASSWORD), with one user made by
    the admin for the study: USER, PASSWORD."""
    if not PG:
        pytest.skip("HARNESS_TEST_PG is not set (.ci/run starts PostgreSQL and sets it)")
    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs mlflow[auth]")
    ini = tmp_path / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{tmp_path / 'auth.db'}\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    admin = "admin-" + uuid.uuid4().hex
    env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex,
    }
    port = free_port()
    artifacts = tmp_path / "artifacts"
    server = start_mlflow_server(_database(), artifacts, port, ("--app-name", "basic-auth"), env)
    uri = f"http://127.0.0.1:{port}"
    from mlflow.server.auth.client import AuthServiceClient

    with pytest.MonkeyPatch.context() as env_of_admin:
        env_of_admin.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        env_of_admin.setenv("MLFLOW_TRACKING_PASSWORD", admin)
        AuthServiceClient(uri).create_user(USER, PASSWORD)
    yield _database(), uri, artifacts
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


def _as(user: str, password: str) -> dict:
    return {**os.environ, "MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}


def test_a_team_server_with_a_login_and_credentials_that_leak_nowhere(
    tmp_path, login_stores, monkeypatch
):
    storage, uri, artifacts = login_stores
    node = tmp_path / "node-a"
    ok = subprocess.run(
        _args(node, storage, uri, 2), cwd=tmp_path, capture_output=True, text=True,
        env=_as(USER, PASSWORD), timeout=600,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-3000:]
    # A wrong password: one clear line and exit 2 at once, not an outage waited for.
    started = time.monotonic()
    bad = subprocess.run(
        _args(tmp_path / "node-b", storage, uri, 3), cwd=tmp_path, capture_output=True,
        text=True, env=_as(USER, "not-" + PASSWORD), timeout=600,
    )  # fmt: skip
    assert bad.returncode == 2, bad.stdout[-2000:] + bad.stderr[-3000:]
    # not retried as an outage: that would have waited the whole retry window (300 s) and
    # printed a line per wait (one line only, below)
    assert time.monotonic() - started < 300
    (line,) = bad.stderr.strip().splitlines()
    assert "refused the login (HTTP 401)" in line and "MLFLOW_TRACKING_PASSWORD" in line, line
    # The study ran: 2 trials, their runs on the server.
    trials = optuna.load_study(study_name="quickstart", storage=open_storage(storage)).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len([r for r in runs if "optuna.trial_number" in r.data.tags]) == 2
    # Nothing leaks: no param, tag, metric name, trial attribute, output, log line or report.
    recorded = [f"{k}={v}" for r in runs for k, v in {**r.data.params, **r.data.tags}.items()]
    recorded += [str(t.user_attrs) + str(t.params) for t in trials]
    recorded += [ok.stdout, ok.stderr, bad.stdout, bad.stderr]
    files = [p for d in (node, tmp_path / "node-b", artifacts) for p in d.rglob("*") if p.is_file()]
    assert any(p.name == "report.md" for p in files) and any(p.suffix == ".log" for p in files)
    for secret in (PASSWORD, USER):
        assert not [r for r in recorded if secret in r], secret
        assert not [p for p in files if secret.encode() in p.read_bytes()], secret
