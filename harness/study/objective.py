"""One trial of a study: its attempt (a store or the environment away leaves it for a
retry), its MLflow run from start to true end, its config, its core, its callbacks, its result
and its faults."""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field

import optuna

from harness.config.load import spec_hash
from harness.config.metrics import KINDS, PRUNED_AT
from harness.config.spec import (
    BASELINE,
    ExperimentSpec,
    SpecError,
    TrialConfig,
    baseline_config,
    trial_config,
)
from harness.config.tags import Tag
from harness.core import checkpoints, tasks
from harness.core.shared import seed_everything
from harness.data import datacache
from harness.infra import envfaults
from harness.reports import report
from harness.study import inputs
from harness.study.recovery import (
    Interrupted,
    TrialWatch,
    attempts,
    fault_kind,
    find_resume,
    mark_stopped,
    requeue,
)
from harness.study.space import PruneOnEpoch, suggest
from harness.tracking import runs, states, sysmetrics
from harness.tracking import store as tracking
from harness.tracking.runs import StudyOptions

UPLOAD_GRACE = 60.0  # seconds a stopped attempt waits for its last state's upload


@dataclass
class Context:
    """What the objective of one study process needs besides the trial."""

    spec: ExperimentSpec
    opts: StudyOptions
    study_name: str
    res: runs.Resources  # data, starting weights and source models, loaded once
    parent_run_id: str
    progress: report.Progress
    logged: set[str] = field(default_factory=set)  # runs whose best weights are in MLflow
    retained: dict[int, bool] = field(default_factory=dict)  # retention's decision by trial

    @property
    def client(self):
        return self.res.client

    @property
    def exp_id(self) -> str:
        return self.res.exp_id


def run_attempt(ctx: Context, trial: optuna.Trial) -> float:
    """One trial attempt. Stopped by a signal or by the environment anywhere (creating its run,
    training, ending it), the trial is queued again, never failed for good: the retry resumes
    from the attempt's last resume state. A store that is away when the stop comes leaves the
    queueing to the next start's `reconcile`, once."""
    try:
        try:
            return objective(ctx, trial)
        except Exception as err:  # raised outside the objective's own handling (its run's start)
            fault = envfaults.disk_full(err, ctx.opts.results)
            if fault is None:
                raise
            raise envfaults.EnvironmentStop(fault) from err
    except (Interrupted, envfaults.EnvironmentStop) as err:
        stopping = isinstance(err, envfaults.EnvironmentStop)
        if stopping:
            mark_stopped(ctx.opts.results, ctx.study_name, trial.number)
        with envfaults.while_stopping(stopping):
            requeue(trial.study, trial.study.trials[trial.number])
        raise


def leave_for_retry(err: BaseException, end_tags: dict) -> None:
    """An attempt stopped by a signal or by the environment: its run says why (its resume
    state stays for the retry)."""
    stop = err if isinstance(err, envfaults.EnvironmentStop) else None
    end_tags[Tag.FAULT] = stop.fault.kind if stop else "interrupted"
    if stop:
        end_tags[Tag.ERROR] = f"{stop.fault.where}: {stop.fault.detail}"


def objective(ctx: Context, trial: optuna.Trial) -> float:
    spec = ctx.spec
    is_baseline = bool(trial.user_attrs.get(Tag.BASELINE))
    values = dict(BASELINE) if is_baseline else suggest(trial, spec)
    try:
        config = baseline_config(spec) if is_baseline else trial_config(spec, values)
    except SpecError as err:  # a sampled combination the config refuses: said, not silent
        trial.set_user_attr(Tag.ERROR, f"the sampled values do not combine: {err}"[:500])
        raise
    data = ctx.res.data_for(config)
    pretrained, pretrained_desc = ctx.res.pretrained_for(config)
    tags = {
        Tag.BASELINE: str(is_baseline).lower(),
        Tag.DATA_HASH: data.data_hash,
        Tag.SPEC_HASH: spec_hash(spec),
        Tag.SAMPLED: ",".join(sorted(values)),
    }
    tags[Tag.PRETRAINED] = pretrained_desc
    if config.model.pretrained == "source":
        tags[Tag.SOURCE_MODEL] = pretrained_desc
    tags.update(runs.provenance(config))
    retry_of = trial.user_attrs.get(Tag.RETRY_OF)
    results = ctx.opts.results
    resume_file = checkpoints.resume_path(results, ctx.study_name, trial.number)
    earlier = attempts(trial)  # the attempts this one retries, the latest first
    if retry_of is not None:
        previous = trial.study.trials[retry_of]
        tags[Tag.RETRY_OF] = previous.user_attrs.get("mlflow_run_id", "")
        tags[Tag.RETRY_OF_TRIAL] = str(retry_of)
        if tags[Tag.RETRY_OF]:  # failed by Optuna's heartbeat as the trial started: its run too
            dead = {Tag.OPTUNA_STATE: "FAIL", Tag.FAULT: "killed"}
            tracking.end_if_running(ctx.client, tags[Tag.RETRY_OF], dead)
    shared = ctx.client if ctx.opts.shared() else None  # resume states in the runs' artifacts
    resume, note = find_resume(results, ctx.study_name, trial, config, shared)
    if note:
        tags[Tag.RESUME] = note
    trial.set_user_attr(Tag.HOST, socket.gethostname())
    trial.set_user_attr(Tag.PID, os.getpid())
    started = time.perf_counter()
    tags |= {
        Tag.PARENT_RUN: ctx.parent_run_id,
        Tag.OPTUNA_STUDY: ctx.study_name,
        Tag.OPTUNA_TRIAL_NUMBER: str(trial.number),
    }
    run = runs.start(
        ctx.client,
        ctx.exp_id,
        f"trial-{trial.number}",
        config,
        tags,
        synchronous=not spec.search.async_logging,
        flush_seconds=spec.search.flush_seconds,
    )
    run_id, logger = run.run_id, run.logger
    trial.set_user_attr("mlflow_run_id", run_id)
    multi = spec.objective.metrics is not None  # Optuna cannot prune (or report) those
    pruner = PruneOnEpoch(trial, spec.objective.metric, enabled=not is_baseline, report=not multi)
    state, end_tags, status, end_metrics = "FAIL", {}, None, {}
    uploads = states.Uploads(ctx.client, run_id) if shared is not None else None
    monitor = sysmetrics.system_monitor(
        run_id, spec.search.system_metrics_interval, ctx.opts.tracking()
    )
    try:
        seed_everything(config.seed)
        model = tasks.build(config, data, pretrained)
        if resume is not None:
            for epoch, m in enumerate(resume["history"], 1):  # the pruner sees the whole curve
                if not multi:
                    trial.report(m[spec.objective.metric], epoch)
            end_tags[Tag.RESUMED_FROM_EPOCH] = resume["epoch"]
        callbacks = [
            logger,
            TrialWatch(trial, resume_file, logger, uploads),
            pruner,
            ctx.progress.epoch_line(trial.number, config.epochs, KINDS[config.task.kind].headline),
        ]
        cache = datacache.under(ctx.opts.results)  # where ranks 1..K-1 load the data from
        result = tasks.train(config, model, data, callbacks, resume=resume, cache_dir=cache)
        if spec.search.keep_checkpoints != "none":
            checkpoints.save_best(results, ctx.study_name, trial.number, result.best_state)
        for k in KINDS[config.task.kind].summary:
            trial.set_user_attr(k, result.best[k])
        trial.set_user_attr("best_epoch", result.best_epoch)
        trial.set_user_attr("epochs_run", len(result.history))
        trial.set_user_attr("seconds", round(result.seconds, 3))
        end_tags[Tag.BEST_EPOCH] = result.best_epoch
        names = (*spec.objective.all_metrics, *KINDS[config.task.kind].summary)
        end_metrics = runs.chosen_epoch_metrics(result, dict.fromkeys(names))
        state = "COMPLETE"
        if multi:
            return tuple(result.best[m] for m in spec.objective.metrics)
        return result.best[spec.objective.metric]
    except optuna.TrialPruned:
        state = "PRUNED"
        end_tags[Tag.PRUNED_EPOCH] = pruner.pruned_at
        end_tags[Tag.DESCRIPTION] = (
            f"Pruned at epoch {pruner.pruned_at} by Optuna's {type(trial.study.pruner).__name__}: "
            f"its {spec.objective.metric} was not promising against the other trials at that "
            "epoch. A finished decision of the search, not a failure (optuna.state=PRUNED)."
        )
        trial.set_user_attr(Tag.PRUNED_EPOCH, pruner.pruned_at)
        trial.set_user_attr("epochs_run", pruner.pruned_at)
        end_metrics = {PRUNED_AT: float(pruner.pruned_at)}  # a column of the study's view
        raise
    except (Interrupted, envfaults.EnvironmentStop) as err:
        status = "KILLED"
        leave_for_retry(err, end_tags)
        raise
    except Exception as err:
        fault = envfaults.disk_full(err, ctx.opts.results)
        if fault is not None:  # a full disk: not the trial's fault
            status, stop = "KILLED", envfaults.EnvironmentStop(fault)
            leave_for_retry(stop, end_tags)
            raise stop from err
        end_tags[Tag.ERROR] = f"{type(err).__name__}: {err}"[:5000]
        end_tags[Tag.FAULT] = fault_kind(err)
        trial.set_user_attr(Tag.ERROR, end_tags[Tag.ERROR][:500])
        trial.set_user_attr(Tag.FAULT, end_tags[Tag.FAULT])
        tracking.log_text(ctx.client, run_id, traceback.format_exc(), "traceback.txt")
        raise
    finally:  # the run ends with the trial's true state, whatever happened
        ending = time.perf_counter()
        monitor.finish()
        stopping = isinstance(sys.exc_info()[1], envfaults.EnvironmentStop)
        if uploads is not None:  # a stopped attempt's last state goes up before its re-queue
            keep = status == "KILLED" and not stopping
            end_metrics = {**end_metrics, **uploads.finish(upload=keep, timeout=UPLOAD_GRACE)}
        with envfaults.while_stopping(stopping):  # a store still away: the next start mends it
            runs.end(
                run,
                status or tracking.STATUS[state],
                {Tag.OPTUNA_STATE: state, **end_tags},
                end_metrics,
            )
        if status != "KILLED":  # a finished or faulty attempt is not resumed: its states go
            for number in (trial.number, *(t.number for t in earlier)):
                checkpoints.drop_resume(results, ctx.study_name, number)
            if shared is not None:
                ids = [run_id, *(t.user_attrs.get("mlflow_run_id") for t in earlier)]
                states.delete_states(ctx.client, [i for i in ids if i])
            # best weights of an attempt that is not COMPLETE (this one failing after writing
            # them, the attempt this one retried) are never retained: they go too
            for number in (retry_of, None if state == "COMPLETE" else trial.number):
                if number is not None:
                    checkpoints.drop_best(results, ctx.study_name, number)
        done = time.perf_counter()
        cost = run.setup_seconds + logger.seconds + (done - ending)
        if not stopping:
            tracking.log_metrics_once(
                ctx.client,
                run_id,
                {"tracking_ms": 1000 * cost, "tracking_share": cost / max(done - started, 1e-9)},
            )


def end_parent(client, parent: str, status: str) -> None:
    """End the study's parent run; when the process stops for the environment, one try (the
    next start reopens it anyway)."""
    with envfaults.while_stopping(isinstance(sys.exc_info()[1], envfaults.EnvironmentStop)):
        tracking.end_run(client, parent, status)


def first_config(spec: ExperimentSpec) -> TrialConfig:
    """The study's first trial: the baseline recipe, or the file's own values without one."""
    return baseline_config(spec) if spec.search.baseline else trial_config(spec, {})


def preflight(ctx: Context, config: TrialConfig) -> None:
    """Fetch (or pretrain) the starting weights and build the model once, before any trial,
    for the first trial and every `model.pretrained` the space can sample: a bad weights name,
    file or model URI is an input error (exit 2), not a study of failed trials. Returns the
    largest model's size in bytes (what a best-weights file holds)."""
    largest = 0
    for c in inputs.starting_configs(ctx.spec, config):
        try:
            pretrained, _ = ctx.res.pretrained_for(c)
            model = tasks.build(c, ctx.res.data_for(c), pretrained)
        except ValueError as err:
            raise SpecError(f"{err}") from None
        state = model.state_dict().values()
        largest = max(largest, sum(t.numel() * t.element_size() for t in state))
    return largest
