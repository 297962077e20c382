"""Stores that go away mid-study, with real processes: a PostgreSQL cluster of the test's own
restarted (fast mode) twice under two workers that use it for Optuna and for an MLflow
tracking server, that server stopped for 30 s and started again on its port, and a store away
for longer than the retry window (exit 75, then the same command goes on)."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
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
from optuna.trial import TrialState

from harness.study.search import open_storage

pytestmark = pytest.mark.slow
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
TRIALS = [  # trials of about 2 s on 2 cores: the outages fall in their middle
    "model.pretrained=none",
    "train.epochs=4",
    "model.width=64",
    "data.shots_per_class=100",
    "search.pruner=none",
    "search.flush_seconds=0",
]


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


class Cluster:
    """A scratch PostgreSQL cluster in a temporary folder, on its own port (as the postgres
    user when the tests run as root: PostgreSQL refuses to run as root)."""

    def __init__(self):
        initdb, self.pg_ctl = _bin("initdb"), _bin("pg_ctl")
        if not initdb or not self.pg_ctl:
            pytest.skip("PostgreSQL's initdb and pg_ctl are not installed (.ci/run installs them)")
        self.dir = Path(tempfile.mkdtemp(prefix="harness-pg-"))
        self.port = free_port()
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user:
            shutil.chown(self.dir, self.user)
        self._as_user(initdb, "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres")
        self.start()

    def _as_user(self, *cmd: str) -> None:
        if self.user:
            cmd = ("runuser", "-u", self.user, "--", *cmd)
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    def _ctl(self, *args: str) -> None:
        # Connections: each worker's Optuna pool, the tracking server's pool and the test's
        # own; 400 is several times what a test here opens (the default, 100, ran out once).
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
        opts += " -c max_connections=400"
        self._as_user(
            self.pg_ctl, "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w",
            "-o", opts, *args,
        )  # fmt: skip

    def start(self) -> None:
        self._ctl("start")

    def stop(self) -> None:
        self._ctl("stop", "-m", "fast")

    def restart(self) -> None:
        self._ctl("restart", "-m", "fast")

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def create(self, db: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {db}")
        return self.url(db)

    def end_connections(self) -> None:
        """End every client connection (what an earlier test left must not count against the
        next one's `max_connections`)."""
        import psycopg

        _STORAGES.clear()
        with contextlib.suppress(Exception), psycopg.connect(self.url(), autocommit=True) as c:
            c.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'"
            )

    def remove(self) -> None:
        with contextlib.suppress(Exception):
            self._ctl("stop", "-m", "immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster_once():
    c = Cluster()
    yield c
    c.remove()


@pytest.fixture
def cluster(cluster_once):
    """The module's cluster, with no connection left by an earlier test."""
    cluster_once.end_connections()
    yield cluster_once
    cluster_once.end_connections()


_STORAGES: dict[str, object] = {}  # one storage (one connection pool) per URL while polling


def _cli(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "run_study.py"), *args]


def _finished(storage_url: str) -> int:
    if storage_url not in _STORAGES:
        _STORAGES[storage_url] = open_storage(storage_url)
    try:
        study = optuna.load_study(study_name="quickstart", storage=_STORAGES[storage_url])
    except KeyError:  # not created yet
        return 0
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def _wait_finished(storage_url: str, n: int, proc: subprocess.Popen, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while _finished(storage_url) < n:
        assert proc.poll() is None, f"the study ended before {n} trials finished"
        assert time.monotonic() < deadline, f"{n} trials did not finish in {timeout} s"
        time.sleep(0.3)


def _check(storage_url: str, tracking_uri: str, budget: int) -> list:
    """Budget kept, no FAIL left unretried, one run per attempt, every curve whole."""
    study = optuna.load_study(study_name="quickstart", storage=open_storage(storage_url))
    trials = study.get_trials()
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == budget  # exact, with two workers too
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert any(t.user_attrs.get("harness.baseline") for t in finished), "the baseline is lost"
    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(experiment_names=["quickstart"], output_format="list")
    assert all(r.info.status != "RUNNING" for r in runs)
    children = [r for r in runs if "optuna.trial_number" in r.data.tags]
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == sorted(
        t.number for t in trials if "mlflow_run_id" in t.user_attrs
    )  # one child run per trial attempt, not one more
    client = mlflow.MlflowClient(tracking_uri)
    for t in finished:  # every epoch Optuna saw is in the run's curve
        if t.user_attrs.get("harness.retry_of") is None:
            history = client.get_metric_history(t.user_attrs["mlflow_run_id"], "val_acc")
            assert sorted(m.step for m in history) == sorted(t.intermediate_values), t.number
    return trials


def test_two_restarts_of_postgresql_and_a_30_s_tracking_server_outage_cost_nothing(
    tmp_path, cluster
):
    optuna_url = cluster.create("outage_optuna")
    mlflow_db = cluster.create("outage_mlflow")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(mlflow_db, tmp_path / "artifacts", port)
    results = tmp_path / "results"
    args = [str(QUICKSTART), "--results", str(results), "--storage", optuna_url]
    args += ["--tracking-uri", uri, "--n-trials", "12", "--workers", "2"]
    for s in TRIALS:
        args += ["--set", s]
    log = open(tmp_path / "study.log", "w")  # noqa: SIM115
    hold = tmp_path / "hold"  # trials from number 6 on hold mid-way: the study is never done
    env = hold_env(hold, epoch=2, from_trial=6)  # before the test has cut the tracking server
    study = subprocess.Popen(
        _cli(*args), stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=env
    )
    try:
        _wait_finished(optuna_url, 2, study)
        cluster.restart()
        _wait_finished(optuna_url, 4, study)
        cluster.restart()
        wait_held(hold, [study])
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        release(hold)  # the held trials go on into the outage
        time.sleep(30)  # the outage's length, not a wait for a state
        server = start_mlflow_server(mlflow_db, tmp_path / "artifacts", port)
        assert study.wait(timeout=600) == 0, (tmp_path / "study.log").read_text()[-3000:]
        trials = _check(optuna_url, uri, 12)
        assert not [t for t in trials if t.state == TrialState.FAIL]  # no trial failed at all
        logs = "".join(p.read_text() for p in (results / "logs" / "quickstart").glob("*.log"))
        assert f"waiting for the MLflow tracking store {uri}: unreachable for" in logs
        assert "reachable again after" in logs
        assert "Traceback" not in logs + (tmp_path / "study.log").read_text()
    finally:
        log.close()
        if study.poll() is None:
            study.kill()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_a_store_away_past_the_window_stops_with_75_and_the_study_goes_on_later(tmp_path, cluster):
    optuna_url = cluster.create("window_optuna")
    results = tmp_path / "results"
    args = [str(QUICKSTART), "--results", str(results), "--storage", optuna_url]
    args += ["--n-trials", "4", "--retry-window", "4"]
    for s in TRIALS:
        args += ["--set", s]
    hold = tmp_path / "hold"
    study = subprocess.Popen(
        _cli(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=hold_env(hold, epoch=2, from_trial=1, when="saved"),
    )
    try:
        wait_held(hold, [study])  # the second trial, mid-way: the study cannot be done yet
        _STORAGES.clear()
        cluster.stop()
        release(hold)
        out, err = study.communicate(timeout=300)
    finally:
        if study.poll() is None:
            study.kill()
        cluster.start()
    assert study.returncode == 75, err[-3000:]
    stopped = err[err.index("Stopped:") :].strip().splitlines()
    assert len(stopped) < 20 and "Traceback" not in err
    redacted = optuna_url.replace("postgresql://postgres@", "postgresql://postgres@")
    assert stopped[0].startswith(f"Stopped: the Optuna storage {redacted} was unreachable for"), (
        stopped[0]
    )
    assert "(--retry-window 4)" in stopped[0]
    assert f"waiting for the Optuna storage {redacted}: unreachable for" in err
    again = subprocess.run(_cli(*args), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    trials = _check(optuna_url, f"sqlite:///{results / 'mlflow.db'}", 4)
    for t in trials:  # the attempt the outage stopped is retried, not failed for good
        if t.state == TrialState.FAIL:
            assert any(u.user_attrs.get("harness.retry_of") == t.number for u in trials)
    with sqlite3.connect(results / "mlflow.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
