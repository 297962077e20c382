"""Fault injection with real processes: kill -9 and SIGTERM mid-trial, then the same command
again; faults inside a trial (NaN, divergence). Nothing lost, nothing duplicated."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import mlflow
import optuna
import pytest
from conftest import QUICKSTART, REPO, hold_env, run_cli, wait_held
from mlflow import MlflowClient

from harness.config.load import load_spec
from harness.core.resume_state import load_state_file
from harness.study.search import StudyOptions, open_storage, run_study

pytestmark = pytest.mark.slow
# Epochs of about 0.4 s each on 2 cores; the trial to stop holds at the awaited epoch
# (tests/hold) until the test has stopped it, so the machine's load cannot make it miss.
SLOW = [
    "model.pretrained=none",
    "model.width=128",
    "data.shots_per_class=150",
    "data.val_per_class=20",
    "train.epochs=4",
    "search.pruner=none",
    "search.flush_seconds=0.5",  # metrics, resume state and heartbeat about every other epoch
    "search.soup=none",  # what is checked here is the trials' recovery (soups: test_soup_study)
]


def _args(
    results, n_trials: int, study: str = "quickstart", extra: tuple[str, ...] = ()
) -> list[str]:
    args = [
        str(QUICKSTART),
        "--n-trials",
        str(n_trials),
        "--results",
        str(results),
        "--quiet",
        "--study-name",
        study,
    ]
    for s in (*SLOW, *extra):
        args += ["--set", s]
    return args


def _start(
    results, n_trials: int, extra: tuple[str, ...] = (), epoch: int = 2, when: str = "saved"
) -> subprocess.Popen:
    """The study, whose first trial holds at `epoch` (see tests/hold) until the test acts."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "run_study.py"), *_args(results, n_trials, extra=extra)],
        cwd=results.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=hold_env(results.parent / "hold", epoch=epoch, when=when),
    )


def _wait_for_epoch(proc, results) -> dict:
    """Until a trial holds: with its resume state of the awaited epoch written."""
    (held,) = wait_held(results.parent / "hold", [proc])
    state = load_state_file(results / "resume" / "quickstart" / f"trial-{held['trial']}.pt")
    assert state["epoch"] == held["written_upto"]  # the state goes with the metrics' writes
    return held


def _records(results, study="quickstart"):
    storage = open_storage(str(results / "optuna.journal"))
    trials = optuna.load_study(study_name=study, storage=storage).get_trials()
    uri = f"sqlite:///{results / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["quickstart"], output_format="list")
    runs = [r for r in runs if r.data.tags.get("optuna.study") == study]
    runs = [r for r in runs if "harness.role" not in r.data.tags]  # trials: no parent, no soup
    return trials, {r.info.run_id: r for r in runs}, MlflowClient(uri)


def _check_recovered(results, fault: str) -> None:
    trials, runs, client = _records(results)
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == 2 and states.count("FAIL") == 1, states
    failed = next(t for t in trials if t.state.name == "FAIL")
    retry = next(t for t in trials if t.user_attrs.get("harness.retry_of") == failed.number)
    assert retry.state.name == "COMPLETE" and retry.params == failed.params
    # One run per attempt, none left RUNNING; the dead attempt's run says what happened.
    assert sorted(t.user_attrs["mlflow_run_id"] for t in trials) == sorted(runs)
    assert all(r.info.status != "RUNNING" for r in runs.values())
    dead = runs[failed.user_attrs["mlflow_run_id"]]
    assert dead.info.status == "KILLED" and dead.data.tags["harness.fault"] == fault
    again = runs[retry.user_attrs["mlflow_run_id"]]
    assert again.data.tags["harness.retry_of"] == dead.info.run_id
    resumed = int(again.data.tags["harness.resumed_from_epoch"])
    assert resumed >= 2
    steps = [m.step for m in client.get_metric_history(again.info.run_id, "val_acc")]
    assert steps == list(range(resumed + 1, 5))  # its curve continues from the resumed epoch
    assert list((results / "resume" / "quickstart").glob("*")) == []  # no state left behind
    # Resume equals uninterrupted: the same config run straight gives the same epochs.
    straight = results.parent / "straight"
    proc = run_cli(*_args(straight, 1, study="straight"), cwd=results.parent)
    assert proc.returncode == 0, proc.stderr
    _, straight_runs, straight_client = _records(straight, study="straight")
    (base,) = straight_runs.values()
    for key in ("val_acc", "train_loss", "overfit_gap", "lr"):
        ours = {m.step: m.value for m in client.get_metric_history(dead.info.run_id, key)}
        ours |= {m.step: m.value for m in client.get_metric_history(again.info.run_id, key)}
        history = straight_client.get_metric_history(base.info.run_id, key)
        theirs = {m.step: m.value for m in history}
        assert ours == theirs, key


def test_kill_9_mid_trial_then_the_same_command_recovers(tmp_path):
    results = tmp_path / "results"
    proc = _start(results, n_trials=2)
    _wait_for_epoch(proc, results)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait(timeout=30)
    again = run_cli(*_args(results, 2), cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    _check_recovered(results, "killed")


def test_sigterm_mid_trial_saves_state_and_exits_within_seconds(tmp_path):
    results = tmp_path / "results"
    proc = _start(results, n_trials=2)
    _wait_for_epoch(proc, results)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=30)
    assert time.monotonic() - sent < 10
    assert code != 0
    trials, runs, _ = _records(results)
    assert not any(t.state.name == "RUNNING" for t in trials)
    assert any(t.state.name == "WAITING" and "harness.retry_of" in t.user_attrs for t in trials)
    assert all(r.info.status != "RUNNING" for r in runs.values())
    again = run_cli(*_args(results, 2), cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    _check_recovered(results, "interrupted")


@pytest.mark.parametrize(
    ("overrides", "fault"),
    [
        (["reg.l2=1e300"], "nan"),  # an infinite penalty makes every weight NaN
        (["train.optimizer=adamw", "train.lr=10.0", "train.max_loss=1000.0"], "diverged"),
    ],
)
def test_faults_inside_a_trial_fail_it_and_the_study_stops_cleanly(results_dir, overrides, fault):
    spec = load_spec(
        QUICKSTART,
        [
            "model.pretrained=none",
            "search.baseline=false",
            "train.epochs=3",
            "strategy.kind=full",
            "train.batch_size=32",
            "aug.policy=none",
            *overrides,
        ],
    )
    summary = run_study(spec, StudyOptions(results=results_dir, n_trials=2, quiet=True))
    assert [t.state for t in summary.trials] == ["FAIL", "FAIL"]  # then it stops, no loop
    client = MlflowClient(f"sqlite:///{results_dir / 'mlflow.db'}")
    for t in summary.trials:
        run = client.get_run(t.attrs["mlflow_run_id"])
        assert run.info.status == "FAILED" and run.data.tags["harness.fault"] == fault
        assert run.data.tags["optuna.state"] == "FAIL"
        if fault == "diverged":  # the curve up to the divergence is kept
            assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1]
    assert not any((results_dir / "resume").rglob("*.pt"))
    assert not any((results_dir / "checkpoints").rglob("*.pt"))


def test_kill_9_between_two_flushes_loses_nothing_and_logs_nothing_twice(tmp_path):
    """Metrics go to MLflow at most every search.flush_seconds, the resume state with them: a
    trial killed between two writes resumes from the last state; its dead attempt logged
    exactly the epochs that state covers, the retry the rest: the combined curve has every
    epoch once and equals an uninterrupted run."""
    extra = ("train.epochs=8", "search.flush_seconds=1.2")  # writes at epochs 1, about 4, 7, 8
    results = tmp_path / "results"
    proc = _start(results, n_trials=1, extra=extra, epoch=3, when="unflushed")
    held = _wait_for_epoch(proc, results)  # an epoch whose metrics are not written yet
    proc.kill()  # between two writes
    proc.wait(timeout=30)
    again = run_cli(*_args(results, 1, extra=extra), cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    trials, runs, client = _records(results)
    dead = next(r for r in runs.values() if r.info.status == "KILLED")
    retry = next(r for r in runs.values() if r.info.status == "FINISHED")
    resumed = int(retry.data.tags["harness.resumed_from_epoch"])
    assert resumed == held["written_upto"] < held["epoch"]  # epochs were lost with the process
    for key in ("val_acc", "train_loss", "lr"):
        before = [m.step for m in client.get_metric_history(dead.info.run_id, key)]
        after = [m.step for m in client.get_metric_history(retry.info.run_id, key)]
        assert sorted(before) == list(range(1, resumed + 1)), key  # exactly the state's epochs
        assert sorted(after) == list(range(resumed + 1, 9)), key
    straight = tmp_path / "straight"
    proc = run_cli(*_args(straight, 1, study="straight", extra=extra), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    _, straight_runs, straight_client = _records(straight, study="straight")
    (base,) = straight_runs.values()
    for key in ("val_acc", "train_loss", "overfit_gap"):
        ours = {m.step: m.value for m in client.get_metric_history(dead.info.run_id, key)}
        ours |= {m.step: m.value for m in client.get_metric_history(retry.info.run_id, key)}
        theirs = {
            m.step: m.value for m in straight_client.get_metric_history(base.info.run_id, key)
        }
        assert ours == theirs, key
