"""When trials are interrupted or fail: the resume state written every epoch, heartbeats, dead
trials found and re-queued, SIGTERM/SIGINT, and the kind of a fault. Used by `harness.study.search`.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import warnings
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from harness.config.tags import Tag
from harness.core import checkpoints, resume_state
from harness.core.distributed import RankFailed
from harness.core.shared import TrainingFault
from harness.data.sources import DataError
from harness.reports.report import own_trials
from harness.tracking import states
from harness.tracking import store as tracking

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what counts toward a study's budget


SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # a stop, or a preemption notice


class Interrupted(KeyboardInterrupt):
    """SIGTERM, SIGINT or SIGUSR1: the running trial keeps its resume state (its last one
    uploaded first, on shared stores), its run ends KILLED (`harness.fault=interrupted`), the
    trial is marked FAIL and re-queued, and the process ends."""


def raise_interrupted(signum, _frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


class TrialWatch:
    """Core callback, after the trial's epoch logger: at each epoch whose metrics the logger
    has just written (its `search.flush_seconds` cadence), a heartbeat on the trial (how other
    processes tell a live trial from a dead one) and the resume state, written atomically.
    So a trial killed between two writes resumes from the last state, and the metrics its run
    logged are those of the epochs that state covers. With `uploads` (shared stores), each
    state is also handed to the background upload to the trial run's artifacts."""

    def __init__(self, trial: optuna.Trial, resume_file: Path, logger, uploads=None):
        self.trial, self.resume_file, self.logger = trial, resume_file, logger
        self.uploads = uploads

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        if self.logger.written_upto == epoch:
            self.trial.set_user_attr(Tag.HEARTBEAT, time.time())

    def wants_state(self, epoch: int) -> bool:
        return self.logger.written_upto == epoch

    def on_checkpoint(self, epoch: int, state: dict) -> None:
        resume_state.save_state(state, self.resume_file)
        if self.uploads is not None:  # a link to this epoch's file: the next write leaves it
            staged = checkpoints.stage(
                self.resume_file, checkpoints.upload_staging(self.resume_file, epoch)
            )
            self.uploads.offer(epoch, staged)


def attempts(trial) -> list:
    """The earlier attempts of a trial, the latest first, by their `harness.retry_of`."""
    trials, out = trial.study.get_trials(deepcopy=False), []
    number = trial.user_attrs.get(Tag.RETRY_OF)
    while number is not None and number < len(trials) and trials[number] not in out:
        out.append(trials[number])
        number = trials[number].user_attrs.get(Tag.RETRY_OF)
    return out


def _checked(load, config) -> dict:
    state = load()
    resume_state.check_state(state, config, resume_state.OWN[config.task.kind])
    return state


def find_resume(results: Path, study_name: str, trial, config, client=None):
    """A retry's resume state, checked against its config: this node's copy of the attempt it
    retries, else (`client`: shared stores) the latest whole state in the runs of its earlier
    attempts. (state, note) or, for a restart from epoch 1, (None, the note for its run): none
    found, or one that is corrupt or saved with another config (never a crash). With a
    state, the note says where it came from; a first attempt gets (None, "")."""
    earlier = attempts(trial)
    if not earlier:
        return None, ""
    problems = []
    local = checkpoints.take_over_resume(results, study_name, earlier[0].number, trial.number)
    if local is not None:
        try:
            state = _checked(lambda: resume_state.load_state_file(local), config)
            return state, f"resumed from epoch {state['epoch']}: this node's state"
        except Exception as err:  # a file cut or changed, another config: the shared one may do
            problems.append(f"this node's state: {err}"[:300])
    folder = checkpoints.fetch_folder(results, study_name, trial.number)
    for attempt in earlier if client is not None else ():
        run_id = attempt.user_attrs.get("mlflow_run_id")
        if not run_id:
            continue
        try:
            found = states.fetch_state(client, run_id, folder)
            if found is None:
                continue
            path = checkpoints.adopt(found[1], results, study_name, trial.number)
            state = _checked(lambda p=path: resume_state.load_state_file(p), config)
            where = f"the shared state of trial {attempt.number}"
            return state, f"resumed from epoch {state['epoch']}: {where}"
        except Exception as err:
            problems.append(f"the shared state of trial {attempt.number}: {err}"[:300])
            break  # the latest state is bad: a restart from epoch 1, said so
    where = "this node or the shared store" if client is not None else "this node"
    return None, "restarted from epoch 1: " + ("; ".join(problems) or f"no resume state on {where}")


def beats(study: optuna.Study) -> bool:
    """Whether the study's storage keeps Optuna's heartbeat (an RDB storage): then Optuna
    decides when another host's trial is dead (`--heartbeat-grace`), not the per-epoch one."""
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(study._storage)


def fail_stale(study: optuna.Study) -> list[int]:
    """Optuna's heartbeat check now (RDB storages): trials whose heartbeat is older than the
    grace are marked FAIL and re-queued (the storage's callback, `requeue`). Their numbers."""
    if not beats(study):
        return []
    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    return sorted(n for n in running if trials[n].state == TrialState.FAIL)


def alive(trial, grace: float = 600.0, heartbeat: bool = False) -> bool:
    """Whether a RUNNING trial's process still runs: by its pid on this host; elsewhere, with
    Optuna's `heartbeat` (RDB storages: `fail_stale` ends the dead), yes; else by the age of
    its per-epoch heartbeat (or of its start, before the first epoch)."""
    a = trial.user_attrs
    if a.get(Tag.HOST) == socket.gethostname() and Tag.PID in a:
        pid = int(a[Tag.PID])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        try:  # a killed process that its parent has not reaped yet is a zombie: dead
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return True
    if heartbeat:
        return True
    last = a.get(Tag.HEARTBEAT) or (
        trial.datetime_start.timestamp() if trial.datetime_start else time.time()
    )
    return time.time() - last < grace


def requeue(study: optuna.Study, trial) -> None:
    """Queue a trial's parameters again, naming the attempt it retries (which also tells the
    retry where the resume state is). Once: an attempt that already has a retry (queued when it
    stopped, before its own end could be stored) gets no second one."""
    if any(
        t.user_attrs.get(Tag.RETRY_OF) == trial.number for t in study.get_trials(deepcopy=False)
    ):
        return
    attrs = {Tag.RETRY_OF: trial.number}
    if trial.user_attrs.get(Tag.BASELINE):
        attrs[Tag.BASELINE] = True
    study.enqueue_trial(dict(trial.params), user_attrs=attrs)


def mark_stopped(results: Path, study_name: str, number: int) -> None:
    """Trial `number` was running when this process stopped for the environment; its store may
    have been away, so that neither its end nor its retry (nor even its pid) got stored: the
    next start on this results folder takes it for dead and re-queues it."""
    checkpoints.stopped_mark(results, study_name, number).touch()


def reconcile(
    study: optuna.Study,
    client,
    study_name: str,
    grace: float = 600.0,
    quick: bool = False,
    results: Path | None = None,
) -> list[int]:
    """Before a study goes on: trials left RUNNING by a dead process (or marked stopped in
    `results` by `mark_stopped`) are marked FAIL and re-queued, and their MLflow runs (and any
    run of the study still RUNNING with no live trial) end KILLED with `harness.fault=killed`.
    Returns the re-queued trial numbers."""
    stopped = checkpoints.stopped_marks(results, study_name) if results is not None else {}
    stale = fail_stale(study)  # Optuna's heartbeat: FAIL and re-queued already
    heartbeat = beats(study)
    dead = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if t.number in stopped or not alive(t, grace, heartbeat)
    ]
    trials = study.get_trials(deepcopy=False) if stopped else []
    for number, mark in stopped.items():  # ended but perhaps not re-queued: at most once
        t = trials[number] if number < len(trials) else None
        if t is not None and t.state == TrialState.FAIL:
            requeue(study, t)
        if t is None or t.state != TrialState.RUNNING:
            mark.unlink(missing_ok=True)
    for t in list(dead):
        try:
            study.tell(t.number, state=TrialState.FAIL)
        except (RuntimeError, ValueError):  # another worker marked it first: it re-queues
            dead.remove(t)
            continue
        requeue(study, t)
        if t.number in stopped:
            stopped[t.number].unlink(missing_ok=True)
    if quick and not dead and not stale:  # after every trial: MLflow only when a process died
        return []
    live = {
        t.user_attrs.get("mlflow_run_id")
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    }
    for run_id in tracking.running_trial_runs(client, study_name):
        if run_id not in live:
            tags = {Tag.OPTUNA_STATE: "FAIL", Tag.FAULT: "killed"}
            tracking.end_run_tagged(client, run_id, "KILLED", tags)
    return sorted([t.number for t in dead] + stale)


def fault_kind(err: BaseException) -> str:
    """`harness.fault` of a failed trial: nan, diverged, oom, data, rank (a rank of a
    data-parallel trial died, raised or hung), or error."""
    if isinstance(err, RankFailed):
        return "rank"
    if isinstance(err, TrainingFault):
        return err.kind
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return "oom"
    if isinstance(err, DataError | OSError):
        return "data"
    return "error"


# --- Study callbacks: the budget across workers, and one error again and again. ---
class ExactBudget:
    """A study callback: stop starting trials once the finished ones and those that live
    processes of the study are running reach the budget. Optuna's MaxTrialsCallback counts the
    finished alone, so two workers ending trials together would both start the last one."""

    def __init__(self, target: int):
        self.target, self.reached = target, False

    def __call__(self, study: optuna.Study, _trial) -> None:
        states = (*FINISHED, TrialState.RUNNING)
        trials = own_trials(study, states)  # a warm start's trials are not in the budget
        finished = sum(t.state in FINISHED for t in trials)
        heartbeat = beats(study)
        running = sum(
            t.state == TrialState.RUNNING and alive(t, heartbeat=heartbeat) for t in trials
        )
        if finished + running >= self.target:
            self.reached = True
            study.stop()


class SameFailure:
    """A study callback: stop when `limit` trials in a row failed with the same error of the
    code, data or environment (a fault that the hyperparameters explain, nan, diverged or oom,
    does not count): one broken thing does not burn the study's budget."""

    def __init__(self, limit: int = 3):
        self.limit, self.last, self.count, self.tripped = limit, None, 0, None

    def __call__(self, study: optuna.Study, trial) -> None:
        error = None
        if trial.state == TrialState.FAIL and trial.user_attrs.get(Tag.FAULT) in (
            "error",
            "data",
        ):
            error = trial.user_attrs.get(Tag.ERROR)
        self.count = self.count + 1 if error is not None and error == self.last else 1
        self.last = error
        if error is not None and self.count >= self.limit:
            self.tripped = error
            study.stop()
