"""Faults of the environment are not faults of a trial: which errors they are, retries of a
store that is away, a full disk at each write site (real processes, exit 75, the same command
completes the study with its baseline), the journal kept whole, the guard against one
repeated error."""

from __future__ import annotations

import errno
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from conftest import QUICKSTART, REPO
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from optuna.trial import TrialState

from harness.core.shared import TrainingFault
from harness.infra import envfaults
from harness.infra.envfaults import EnvironmentStop, Fault, classify
from harness.study.recovery import SameFailure, requeue
from harness.study.storage import _JournalFile, open_storage


# --- Which errors are the environment's ---
def _raised_from(outer: Exception, cause: BaseException) -> Exception:
    try:
        try:
            raise cause
        except BaseException as err:
            raise outer from err
    except Exception as err:
        return err


def test_a_full_disk_is_recognised_through_the_cause_chain(tmp_path):
    enospc = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "a" / "x.pt"))
    f = classify(enospc)
    assert f.kind == "disk_full" and f.where == str(tmp_path / "a")
    sqlite_full = _raised_from(
        MlflowException("(sqlite3.OperationalError) database or disk is full"),
        sqlalchemy.exc.OperationalError("INSERT", {}, sqlite3.OperationalError("disk is full")),
    )
    assert classify(sqlite_full, folder=tmp_path) == Fault(
        "disk_full", str(tmp_path), sqlite_full.__class__.__name__ + ": " + str(sqlite_full)
    )
    quota = _raised_from(RuntimeError("write failed"), OSError(errno.EDQUOT, "Disk quota"))
    assert classify(quota).kind == "disk_full"


def test_torch_hides_enospc_so_the_free_space_decides(tmp_path, monkeypatch):
    err = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4480 vs 4374")
    monkeypatch.setattr(envfaults, "free_bytes", lambda _f: 10 * 2**30)
    assert classify(err, folder=tmp_path) is None  # room left: a bug, not the disk
    monkeypatch.setattr(envfaults, "free_bytes", lambda _f: 4096)
    f = classify(err, folder=tmp_path)
    assert f.kind == "disk_full" and f.where == str(tmp_path)
    assert classify(err) is None  # no folder written to: nothing to check


def test_a_store_away_is_recognised_and_a_trial_fault_is_not():
    import psycopg

    shutting = psycopg.OperationalError("FATAL: the database system is shutting down")
    storage_err = _raised_from(optuna.exceptions.StorageInternalError("boom"), shutting)
    assert classify(storage_err, store="the Optuna storage x").kind == "store"
    assert classify(ConnectionRefusedError(111, "Connection refused")).kind == "store"
    http = MlflowException(
        "API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/create failed with exception "
        "HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded"
    )
    assert classify(http, remote=True).kind == "store"
    server_500 = MlflowException("boom", error_code="INTERNAL_ERROR")
    assert classify(server_500, remote=True).kind == "store"  # the tracking server's 5xx
    assert classify(server_500, remote=False) is None  # the local store's own error: a bug
    locked = MlflowException("(sqlite3.OperationalError) database is locked")
    assert classify(locked).kind == "store"
    wrong = psycopg.OperationalError('connection failed: FATAL: database "nodb" does not exist')
    assert classify(wrong) is None  # waiting does not mend a wrong URL or login
    assert envfaults.disk_full(TimeoutError("collective timed out")) is None  # a trial's own
    for err in (
        ValueError("bad value"),
        TrainingFault("nan", "loss is nan"),
        sqlalchemy.exc.OperationalError("SELECT", {}, sqlite3.OperationalError("no such table")),
        KeyError("overfit_gap"),
    ):
        assert classify(err) is None, err


# --- Retries ---
def test_a_store_back_within_the_window_costs_nothing(monkeypatch, capsys):
    monkeypatch.setattr(envfaults.settings, "window", 30.0)
    calls = []

    def flaky():
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionRefusedError(111, "Connection refused")
        return "ok"

    assert envfaults.retrying(flaky, "the MLflow tracking store http://h:5000")() == "ok"
    err = capsys.readouterr().err
    assert "waiting for the MLflow tracking store http://h:5000: unreachable for 0 s" in err
    assert "--retry-window" in err and "reachable again" in err
    assert len(calls) == 3


def test_past_the_window_the_call_stops_the_worker_and_a_full_disk_at_once(monkeypatch):
    monkeypatch.setattr(envfaults.settings, "window", 0.6)
    started = time.monotonic()
    with pytest.raises(EnvironmentStop) as stop:
        envfaults.retrying(lambda: (_ for _ in ()).throw(TimeoutError("timed out")), "db")()
    assert 0.6 <= time.monotonic() - started < 5
    assert stop.value.fault.kind == "store" and stop.value.waited >= 0.6
    text = stop.value.message()
    assert text.startswith("Stopped: db was unreachable for 1 s (--retry-window 0.6)")
    assert "run the same command again" in text and len(text.splitlines()) < 20
    monkeypatch.setattr(envfaults.settings, "window", 60.0)  # a full disk does not wait it
    started = time.monotonic()
    with pytest.raises(EnvironmentStop) as stop:
        envfaults.retrying(lambda: (_ for _ in ()).throw(_enospc("/r/x")), "db")()
    assert time.monotonic() - started < 30 and stop.value.fault.where == "/r"
    with pytest.raises(ValueError):  # not the environment's: raised at once, as it was
        envfaults.retrying(lambda: (_ for _ in ()).throw(ValueError("x")), "db")()


def _enospc(path: str) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", path)


def test_the_optuna_storage_and_the_mlflow_client_retry_every_call(tmp_path, monkeypatch):
    monkeypatch.setattr(envfaults.settings, "window", 30.0)
    storage = open_storage(str(tmp_path / "s.journal"))
    study = optuna.create_study(storage=storage, study_name="s")
    failures = [ConnectionResetError(104, "Connection reset by peer")]
    original = _JournalFile.append_logs

    def append_logs(self, logs):
        if failures:
            raise failures.pop()
        return original(self, logs)

    monkeypatch.setattr(_JournalFile, "append_logs", append_logs)
    study.enqueue_trial({"x": 1.0})  # one journal write, retried after a reset
    assert not failures and len(study.trials) == 1
    from harness.tracking import store as tracking

    client = tracking.connect(f"sqlite:///{tmp_path / 'm.db'}")
    assert getattr(client.log_batch, "__wrapped__", None) is not None
    assert getattr(client.create_run, "__wrapped__", None) is not None


# --- The journal stays whole on a full disk ---
def test_a_journal_append_on_a_full_disk_leaves_no_partial_record(tmp_path, monkeypatch):
    path = tmp_path / "s.journal"
    study = optuna.create_study(storage=open_storage(str(path)), study_name="s")
    study.enqueue_trial({"x": 1.0})
    size = path.stat().st_size
    real_write = __import__("os").write

    def half_then_full(fd, data):  # the disk takes part of the record, then is full
        if len(data) > 8:
            real_write(fd, bytes(data[: len(data) // 2]))
            return len(data) // 2
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("harness.study.storage.os.write", half_then_full)
    with pytest.raises(EnvironmentStop) as stop:
        study.enqueue_trial({"x": 2.0})
    assert stop.value.fault.kind == "disk_full"
    assert path.stat().st_size == size  # the half record was taken back
    monkeypatch.undo()
    study.enqueue_trial({"x": 3.0})  # space back: the journal goes on and loads
    again = optuna.load_study(study_name="s", storage=open_storage(str(path)))
    assert len(again.trials) == 2


def test_a_partial_record_left_by_a_crash_is_dropped_when_the_journal_opens(tmp_path):
    path = tmp_path / "s.journal"
    optuna.create_study(storage=open_storage(str(path)), study_name="s").enqueue_trial({})
    with open(path, "ab") as f:
        f.write(b'{"op_code":5,"worker_id":"x","trial_id":0,"par')  # a crash mid-record
    study = optuna.load_study(study_name="s", storage=open_storage(str(path)))
    study.enqueue_trial({})
    assert len(optuna.load_study(study_name="s", storage=open_storage(str(path))).trials) == 2


# --- Re-queued once; the guard against one repeated error ---
def test_an_attempt_is_requeued_once_whoever_asks(tmp_path):
    study = optuna.create_study(storage=open_storage(str(tmp_path / "s.journal")))
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    frozen = study.trials[trial.number]
    requeue(study, frozen)
    requeue(study, frozen)  # the next start's reconcile, say, after a stop that queued it
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].user_attrs["harness.retry_of"] == trial.number


def test_three_trials_failing_with_the_same_error_stop_the_study():
    errors = iter(
        [("KeyError: 'a'", "error"), ("KeyError: 'b'", "error")]
        + [("nan at epoch 2", "nan")] * 3  # the hyperparameters' fault: never counted
        + [("OSError: [Errno 5] Input/output error", "error")] * 5
    )

    def objective(trial):
        error, fault = next(errors)
        trial.set_user_attr("harness.error", error)
        trial.set_user_attr("harness.fault", fault)
        raise RuntimeError(error)

    study = optuna.create_study()
    guard = SameFailure(limit=3)
    study.optimize(objective, n_trials=10, callbacks=[guard], catch=(RuntimeError,))
    assert len(study.trials) == 8  # stopped at the third identical error, not at the tenth
    assert guard.tripped == "OSError: [Errno 5] Input/output error"


def test_the_free_space_check_warns_before_the_first_trial(tmp_path, monkeypatch):
    assert envfaults.check_space(tmp_path, 1024) is None
    monkeypatch.setattr(envfaults, "free_bytes", lambda _f: 3 * 2**20)
    text = envfaults.check_space(tmp_path, 40 * 2**20)
    assert text.startswith(f"warning: {tmp_path} has 3.0 MB free; this study will keep about")
    assert "40.0 MB" in text and "exit 75" in text


def test_a_negative_retry_window_is_refused(tmp_path):
    from harness.cli import main

    assert main([str(QUICKSTART), "--retry-window", "-1", "--results", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()


# --- A full disk at each write site, with real processes ---
STUDY = [
    "model.pretrained=none",
    "train.epochs=3",
    "search.pruner=none",
    "search.flush_seconds=0",  # every epoch: metrics, resume state and heartbeat
    "search.n_trials=3",
]


def _completed_with_baseline(results: Path, budget: int) -> list:
    """The study's trials, after checking that its budget finished, its baseline among them."""
    study = optuna.load_study(
        study_name="quickstart", storage=open_storage(str(results / "optuna.journal"))
    )
    trials = study.get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == budget
    assert [t for t in finished if t.user_attrs.get("harness.baseline")], "the baseline is lost"
    return trials


def _inject(results: Path, site: str, after: int) -> subprocess.CompletedProcess:
    args = [str(QUICKSTART), "--results", str(results), "--quiet"]
    for s in STUDY:
        args += ["--set", s]
    return subprocess.run(
        [sys.executable, str(REPO / "tests" / "inject.py"), site, str(after), *args],
        cwd=results.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_a_full_disk_at_each_write_site_stops_with_75_and_the_same_command_completes(tmp_path):
    """One study met by a full disk at each of its write sites in turn (each a new process, as
    a user reruns the command): each time exit 75 and a short message naming the folder; with
    space back the same command completes the study, the baseline included, and the stores
    are consistent."""
    results = tmp_path / "results"
    steps = [
        ("resume", 1),  # the baseline's 2nd resume state
        ("checkpoint", 0),  # its retry resumes at epoch 2, then its best weights
        ("mlflow", 0),  # the next retry's run (its params)
        ("artifact", 0),  # the baseline completes; its weights' MLflow copy
        ("journal", 0),  # the next trial's start
        ("report", 0),  # every trial done; the report's first plot
    ]
    for site, after in steps:
        out = _inject(results, site, after)
        assert out.returncode == 75, (site, out.stdout[-2000:], out.stderr[-3000:])
        err = out.stderr.strip().splitlines()
        stopped = [line for line in err if line.startswith("Stopped: the disk of")]
        assert stopped, (site, out.stderr[-3000:])
        assert len(out.stderr[out.stderr.index("Stopped:") :].splitlines()) < 20
        assert "Traceback" not in out.stderr and "Traceback" not in out.stdout, site
        assert not [line for line in err if "ERROR" in line], (site, out.stderr[-3000:])
        assert len(err) <= 6, (site, out.stderr[-3000:])  # the harness's message alone
        assert "run the same command again" in out.stderr
        if site != "artifact":  # that one names the artifact store's folder
            assert stopped[0].startswith(f"Stopped: the disk of {results}"), (site, stopped[0])
        assert not (results / "reports" / "quickstart" / "report.md").exists()
    done = _inject(results, "none", 0)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (results / "reports" / "quickstart" / "report.md").is_file()

    trials = _completed_with_baseline(results, 3)
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    retried = {t.user_attrs.get("harness.retry_of") for t in trials}
    for t in trials:
        if t.state == TrialState.FAIL:  # every interrupted attempt has its retry
            assert t.number in retried, t.number
    assert "harness.error" not in {k for t in trials for k in t.user_attrs}

    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    by_trial: dict[str, list] = {}
    for r in runs:
        if "optuna.trial_number" in r.data.tags:
            by_trial.setdefault(r.data.tags["optuna.trial_number"], []).append(r)
    assert all(len(v) == 1 for v in by_trial.values()), {k: len(v) for k, v in by_trial.items()}
    for t in trials:
        if "mlflow_run_id" in t.user_attrs:
            assert by_trial[str(t.number)][0].info.run_id == t.user_attrs["mlflow_run_id"]
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert {r.data.tags.get("harness.fault") for r in killed} <= {"disk_full", "killed"}
    assert any(r.data.tags.get("harness.fault") == "disk_full" for r in killed)
    with sqlite3.connect(results / "mlflow.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.fixture
def small_disk(tmp_path):
    """A 48 MB tmpfs of the test's own (root can mount one; CI runs as root), else skip."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()[:200]}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_real_full_disk_stops_with_75_and_space_back_completes_the_study(small_disk):
    """The issue's case on a real filesystem: the results folder's disk fills up while the
    baseline trains. Before: 58 trials FAILED in seconds and the baseline was lost. Now: exit
    75 at the first full write, and with space back the same command completes the study, its
    baseline included."""
    results = small_disk / "results"
    args = [str(QUICKSTART), "--results", str(results), "--quiet", "--n-trials", "3"]
    for s in [*STUDY[:-1], "train.epochs=4"]:
        args += ["--set", s]
    cli = [sys.executable, str(REPO / "run_study.py"), *args]
    made = subprocess.run([*cli, "--timeout", "0.001"], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr[-2000:]  # the stores and the study, no trial
    filler = small_disk / "filler"
    left = 300 * 1024  # the baseline's first epochs fit, its run's curve and weights do not
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, envfaults.free_bytes(small_disk) - left))
    full = subprocess.run(cli, capture_output=True, text=True, timeout=600)
    assert full.returncode == 75, (full.stdout[-2000:], full.stderr[-3000:])
    assert "warning: " + str(results) + " has " in full.stderr  # before the first trial
    assert "warning:" not in made.stderr  # 48 MB were enough for what it would keep
    message = full.stderr[full.stderr.index("Stopped: the disk of ") :]
    assert len(message.splitlines()) < 20 and "Traceback" not in full.stderr
    # the harness's lines alone: MLflow's ERROR log of the failed insert went to its log file
    assert not [line for line in full.stderr.splitlines() if "ERROR" in line], full.stderr
    assert len(full.stderr.strip().splitlines()) <= 6, full.stderr
    assert str(small_disk) in message.splitlines()[0]
    filler.unlink()  # space back
    done = subprocess.run(cli, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = _completed_with_baseline(results, 3)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) <= 1  # the one attempt the full disk interrupted, retried
    retried = {t.user_attrs.get("harness.retry_of") for t in trials}
    assert all(t.number in retried for t in failed)
    if failed:  # the report does not call it a failure
        assert "0 failed (1 interrupted attempt, re-queued and retried)" in done.stdout
    with sqlite3.connect(results / "mlflow.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert not [r for r in runs if r.info.status == "RUNNING"]


def test_one_try_holds_for_its_own_thread_only(monkeypatch):
    """A helper thread's one try (the params' timer) never shortens another thread's window."""
    import threading

    monkeypatch.setattr(envfaults.settings, "window", 30.0)
    away = envfaults.retrying(lambda: (_ for _ in ()).throw(TimeoutError("timed out")), "db")
    seen = {}

    def helper():
        with envfaults.one_try():
            try:
                away()
            except EnvironmentStop as stop:
                seen["waited"] = stop.waited

    with envfaults.one_try():
        pass
    thread = threading.Thread(target=helper)
    thread.start()
    thread.join(timeout=10)
    assert seen["waited"] < 1 and envfaults._window() == 30.0


def test_the_budget_counts_trials_that_live_workers_are_running():
    """Two workers ending trials together would both start the last one: the finished trials
    and those live processes run make the budget; a dead process's trial does not count."""
    import os
    import socket

    from harness.study.recovery import ExactBudget

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], **_TEXT)
    for pid, new_trials in ((int(ended.stdout), 3), (os.getpid(), 2)):
        study = optuna.create_study()
        study.tell(study.ask(), 1.0)
        other = study.ask()  # another worker's trial, still RUNNING
        other.set_user_attr("harness.host", socket.gethostname())
        other.set_user_attr("harness.pid", pid)
        budget = ExactBudget(4)
        study.optimize(lambda t: 1.0, n_trials=10, callbacks=[budget])
        assert budget.reached
        assert len(study.trials) == 2 + new_trials, pid  # 1 + new (+ 1 live) reach 4


_TEXT = {"capture_output": True, "text": True}
