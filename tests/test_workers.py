"""Several workers of one study: GPU assignment, the local stores with --workers, and
PostgreSQL with an MLflow tracking server (run in CI, where .ci/run starts PostgreSQL)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import optuna
import pytest
from conftest import (
    QUICKSTART,
    REPO,
    free_port,
    hold_env,
    release,
    start_mlflow_server,
    wait_held,
)

from harness.study.search import open_storage
from harness.study.workers import assign, visible_gpus, worker_count

PG = os.environ.get("HARNESS_TEST_PG")  # e.g. postgresql://harness:harness@127.0.0.1/postgres
TINY = ["model.pretrained=none", "train.epochs=2", "search.pruner=none"]


# --- GPU and thread assignment (pure functions) ---
@pytest.mark.parametrize(
    ("env", "count", "gpus"),
    [
        ({}, 0, []),
        ({}, 1, ["0"]),
        ({}, 4, ["0", "1", "2", "3"]),
        ({}, 8, [str(i) for i in range(8)]),
        ({"CUDA_VISIBLE_DEVICES": "1,3,6"}, 8, ["1", "3", "6"]),  # gaps kept as written
        ({"CUDA_VISIBLE_DEVICES": ""}, 8, []),
        ({"CUDA_VISIBLE_DEVICES": "-1"}, 8, []),
    ],
)
def test_visible_gpus(env, count, gpus):
    assert visible_gpus(env, device_count=count) == gpus


@pytest.mark.parametrize("n_gpus", [0, 1, 4, 8])
def test_auto_is_one_worker_per_gpu_each_pinned(n_gpus):
    gpus = [str(i) for i in range(n_gpus)]
    n = worker_count("auto", gpus)
    assert n == max(1, n_gpus)
    envs = assign(n, gpus, cpus=16)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == (gpus or [""])
    assert all(int(e["OMP_NUM_THREADS"]) == 16 // n for e in envs)
    assert [e["HARNESS_WORKER_INDEX"] for e in envs] == [str(i) for i in range(n)]


def test_more_workers_than_gpus_share_them_round_robin():
    envs = assign(5, ["1", "3", "6"], cpus=2)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["1", "3", "6", "1", "3"]
    assert all(e["OMP_NUM_THREADS"] == "1" for e in envs)  # at least one thread each
    with pytest.raises(ValueError, match="--workers 0"):
        worker_count("0", [])


# --- Workers end to end ---
def _cli(*args, env=None) -> list[str]:
    return [sys.executable, str(REPO / "run_study.py"), *args]


def _check_study(storage_url: str, tracking_uri: str, budget: int, n_workers: int) -> list:
    study = optuna.load_study(study_name="quickstart", storage=open_storage(storage_url))
    trials = study.get_trials()
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert budget <= len(finished) <= budget + n_workers - 1
    assert len({t.number for t in trials}) == len(trials)
    assert not [t for t in trials if t.state.name == "RUNNING"]
    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(experiment_names=["quickstart"], output_format="list")
    parents = [r for r in runs if r.data.tags.get("harness.role") == "study"]
    assert len(parents) == 1
    children = [r for r in runs if "optuna.trial_number" in r.data.tags]
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == sorted(
        t.number for t in trials if "mlflow_run_id" in t.user_attrs
    )  # one child run per trial attempt
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    running = [
        (r.info.run_name, r.data.tags.get("harness.role"))
        for r in runs
        if r.info.status == "RUNNING"
    ]
    assert not running, f"runs left RUNNING: {running}"
    # the sampled parameters differ between workers (each has its own sampler seed)
    params = [tuple(sorted(t.params.items())) for t in finished if t.params]
    assert len(set(params)) == len(params)
    return trials


def _logs_clean(folder) -> None:
    for log in folder.glob("worker-*.log"):
        text = log.read_text()
        assert not re.search(r"database is locked|UniqueViolation|CommandError|Traceback", text), (
            log.name + text[-2000:]
        )


def _kill_a_worker_mid_trial(spawner: subprocess.Popen, hold: Path) -> int:
    """kill -9 one of the spawner's workers while it holds in a trial (RUNNING, heartbeat and
    resume state written: tests/hold), then let the others go on; the trial's number."""
    import psutil

    held = wait_held(hold, [spawner])[0]
    assert held["pid"] in {c.pid for c in psutil.Process(spawner.pid).children()}
    os.kill(held["pid"], signal.SIGKILL)
    release(hold)
    return held["trial"]


@pytest.mark.slow
def test_three_local_workers_share_the_journal_and_sqlite(tmp_path):
    results = tmp_path / "results"
    args = [str(QUICKSTART), "--results", str(results), "--n-trials", "12", "--workers", "3"]
    for s in [*TINY, "train.epochs=3", "data.shots_per_class=100", "search.flush_seconds=0"]:
        args += ["--set", s]
    hold = tmp_path / "hold"
    spawner = subprocess.Popen(
        _cli(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env=hold_env(hold, epoch=1),
    )
    killed = _kill_a_worker_mid_trial(spawner, hold)
    out = spawner.communicate(timeout=600)[0]
    assert spawner.returncode == 0, out[-3000:]
    assert "3 workers of study 'quickstart'" in out
    assert "Gain of the best trial" in out  # reported once, by the spawning process
    trials = _check_study(
        str(results / "optuna.journal"), f"sqlite:///{results / 'mlflow.db'}", 12, 3
    )
    retried = [t for t in trials if t.user_attrs.get("harness.retry_of") == killed]
    assert len(retried) == 1 and retried[0].state.name == "COMPLETE"
    _logs_clean(results / "logs" / "quickstart")  # the killed worker's log just stops
    assert len(list((results / "reports" / "quickstart").glob("report.md"))) == 1


@pytest.fixture
def pg_stores(tmp_path):
    """Two fresh PostgreSQL databases (Optuna, MLflow) and an MLflow server on the second."""
    if not PG:
        pytest.skip("HARNESS_TEST_PG is not set (.ci/run starts PostgreSQL and sets it)")
    import psycopg

    names = [f"harness_{kind}_{uuid.uuid4().hex[:8]}" for kind in ("optuna", "mlflow")]
    with psycopg.connect(PG, autocommit=True) as conn:
        for name in names:
            conn.execute(f"CREATE DATABASE {name}")
    base = PG.rsplit("/", 1)[0]
    optuna_url, mlflow_db = (f"{base}/{n}" for n in names)
    port = free_port()
    server = start_mlflow_server(mlflow_db, tmp_path / "artifacts", port)
    uri = f"http://127.0.0.1:{port}"
    yield optuna_url, uri
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


@pytest.mark.slow
def test_workers_on_postgresql_and_a_tracking_server_survive_a_killed_worker(tmp_path, pg_stores):
    optuna_url, uri = pg_stores
    results = tmp_path / "results"
    base = [
        str(QUICKSTART),
        "--results",
        str(results),
        "--storage",
        optuna_url,
        "--tracking-uri",
        uri,
        "--n-trials",
        "12",
        "--quiet",
    ]
    slow = [*TINY, "train.epochs=3", "data.shots_per_class=100", "search.flush_seconds=0"]
    for s in slow:
        base += ["--set", s]
    # The first node creates the stores and the study, then three workers start together.
    first = subprocess.run(
        _cli(*base, "--timeout", "0.001"), capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert first.returncode == 0, first.stderr[-3000:]
    logs = []
    procs = []
    hold = tmp_path / "hold"
    for i in range(3):
        log = open(tmp_path / f"node-{i}.log", "w")  # noqa: SIM115
        logs.append(log)
        procs.append(
            subprocess.Popen(
                _cli(*base),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
                env=hold_env(hold, epoch=1),
            )
        )
    # Kill one worker -9 in the middle of a trial (held there: tests/hold): the others retry it.
    victim = procs[0]
    (held,) = wait_held(hold, [victim], pids={victim.pid})
    study = optuna.load_study(study_name="quickstart", storage=open_storage(optuna_url))
    trial = study.get_trials(deepcopy=False)[held["trial"]]
    assert trial.state.name == "RUNNING" and trial.user_attrs.get("harness.heartbeat")
    victim.kill()
    killed = held["trial"]
    release(hold)
    for p in procs[1:]:
        assert p.wait(timeout=600) == 0, (tmp_path / "node-1.log").read_text()[-3000:]
    victim.wait()
    for log in logs:
        log.close()
    trials = _check_study(optuna_url, uri, 12, 3)
    retried = [t for t in trials if t.user_attrs.get("harness.retry_of") == killed]
    assert len(retried) == 1 and retried[0].state.name == "COMPLETE"
    for i in (1, 2):
        text = (tmp_path / f"node-{i}.log").read_text()
        assert not re.search(r"UniqueViolation|database is locked|Traceback", text), text[-2000:]


@pytest.mark.slow
def test_independent_processes_started_together_on_fresh_stores(tmp_path):
    """Three plain invocations at the same moment on a fresh results folder: the stores are
    initialised once (with retries), one process creates the study, all of them work on it."""
    results = tmp_path / "results"
    args = [str(QUICKSTART), "--results", str(results), "--n-trials", "6", "--quiet"]
    for s in TINY:
        args += ["--set", s]
    procs = [
        subprocess.Popen(
            _cli(*args), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(o[-2000:] for o in outs)
    _check_study(str(results / "optuna.journal"), f"sqlite:///{results / 'mlflow.db'}", 6, 3)
