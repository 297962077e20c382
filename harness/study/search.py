"""Optuna, and only here: storages, samplers, pruners, the conditional search space, the trial
objective, and the study loop with its total budget of finished trials.

One trial: sample (or take the baseline recipe) -> TrialConfig -> child MLflow run -> `fit`
with callbacks (metrics to MLflow, values to the pruner, progress) -> Optuna value and state.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from harness.config.metrics import KINDS
from harness.config.spec import (
    BASELINE,
    ExperimentSpec,
    SpecError,
    TrialConfig,
    active,
    baseline_config,
    fixed_values,
    grid_points,
    safe_name,
    spec_hash,
    trial_config,
)
from harness.core import resume_state, tasks
from harness.core.shared import seed_everything
from harness.data import datacache
from harness.infra import envfaults
from harness.infra.files import atomic_write
from harness.reports import report
from harness.study import inputs, retention, workers
from harness.study.finish import finish_report, summarize
from harness.study.recovery import (
    FINISHED,
    ExactBudget,
    Interrupted,
    SameFailure,
    TrialWatch,
    fault_kind,
    mark_stopped,
    raise_interrupted,
    reconcile,
    requeue,
    resume_path,
)
from harness.study.storage import open_storage
from harness.tracking import relocation, runs
from harness.tracking import store as tracking
from harness.tracking.runs import StudyOptions, best_weights_path


# --- Storages, samplers, pruners. ---
def make_sampler(spec: ExperimentSpec, salt: int = 0) -> optuna.samplers.BaseSampler:
    """The file's sampler, seeded with `seed + salt` (each worker of a study has its own salt,
    or every worker would propose the same parameters)."""
    seed = spec.seed + salt
    return {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed, n_startup_trials=5),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed, n_startup_trials=5),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
        "grid": lambda: optuna.samplers.GridSampler(
            {k: p.categorical for k, p in spec.search.space.items()}, seed=seed
        ),
    }[spec.search.sampler]()


def make_pruner(spec: ExperimentSpec) -> optuna.pruners.BasePruner:
    s = spec.search
    if s.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=5, n_warmup_steps=s.pruner_warmup_epochs
        )
    if s.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=spec.epochs)
    return optuna.pruners.NopPruner()


def suggest(trial: optuna.Trial, spec: ExperimentSpec) -> dict[str, Any]:
    """Sample the space in file order; a conditional key is sampled only when its `when` holds."""
    known = fixed_values(spec)
    sampled: dict[str, Any] = {}
    for key, p in spec.search.space.items():
        if not active(p, known):
            continue
        if p.kind == "categorical":
            value = trial.suggest_categorical(key, p.categorical)
        elif p.kind == "int":
            step = int(p.step) if p.step else 1
            value = trial.suggest_int(key, p.int_[0], p.int_[1], step=step, log=p.log)
        else:
            value = trial.suggest_float(key, p.float_[0], p.float_[1], step=p.step, log=p.log)
        sampled[key] = known[key] = value
    return sampled


# --- Core callbacks owned by the study. ---
class PruneOnEpoch:
    """Reports the objective metric each epoch; raises TrialPruned when the pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str, enabled: bool = True, report=True):
        self.trial, self.metric, self.pruned_at = trial, metric, None
        self.enabled, self.report = enabled and report, report

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        if not self.report:
            return
        self.trial.report(metrics[self.metric], epoch)
        if self.enabled and self.trial.should_prune():
            self.pruned_at = epoch
            raise optuna.TrialPruned(f"pruned at epoch {epoch}")


@dataclass
class _Context:
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


def _attempt(ctx: _Context, trial: optuna.Trial) -> float:
    """One trial attempt. Stopped by a signal or by the environment anywhere (creating its run,
    training, ending it), the trial is queued again, never failed for good: the retry resumes
    from the attempt's last resume state. A store that is away when the stop comes leaves the
    queueing to the next start's `reconcile`, once."""
    try:
        try:
            return _objective(ctx, trial)
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


def _leave_for_retry(err: BaseException, end_tags: dict) -> None:
    """An attempt stopped by a signal or by the environment: its run says why (its resume
    state stays for the retry)."""
    stop = err if isinstance(err, envfaults.EnvironmentStop) else None
    end_tags["harness.fault"] = stop.fault.kind if stop else "interrupted"
    if stop:
        end_tags["harness.error"] = f"{stop.fault.where}: {stop.fault.detail}"


def _objective(ctx: _Context, trial: optuna.Trial) -> float:
    spec = ctx.spec
    is_baseline = bool(trial.user_attrs.get("harness.baseline"))
    values = dict(BASELINE) if is_baseline else suggest(trial, spec)
    config = baseline_config(spec) if is_baseline else trial_config(spec, values)
    data = ctx.res.data_for(config)
    pretrained, pretrained_desc = ctx.res.pretrained_for(config)
    tags = {
        "harness.baseline": str(is_baseline).lower(),
        "harness.data_hash": data.data_hash,
        "harness.spec_hash": spec_hash(spec),
        "harness.sampled": ",".join(sorted(values)),
    }
    tags["harness.pretrained"] = pretrained_desc
    if config.model.pretrained == "source":
        tags["harness.source_model"] = pretrained_desc
    tags.update(runs.provenance(config))
    retry_of = trial.user_attrs.get("harness.retry_of")
    resume_from = None
    resume_file = resume_path(ctx.opts.results, ctx.study_name, trial.number)
    if retry_of is not None:
        previous = trial.study.trials[retry_of]
        tags["harness.retry_of"] = previous.user_attrs.get("mlflow_run_id", "")
        tags["harness.retry_of_trial"] = str(retry_of)
        old_file = resume_path(ctx.opts.results, ctx.study_name, retry_of)
        if old_file.is_file():  # this attempt holds it now, so a stop at any point keeps it
            old_file.replace(resume_file)
            resume_from = resume_file
        else:  # another node's attempt, or it died before its first epoch ended
            tags["harness.resume"] = "restarted from epoch 1: no resume state on this node"
    if config.task.kind != "finetune" and resume_from is not None:  # only fit resumes
        resume_from, tags["harness.resume"] = None, "restarted from epoch 1: only fit resumes"
    trial.set_user_attr("harness.host", socket.gethostname())
    trial.set_user_attr("harness.pid", os.getpid())
    started = time.perf_counter()
    tags |= {
        "mlflow.parentRunId": ctx.parent_run_id,
        "optuna.study": ctx.study_name,
        "optuna.trial_number": str(trial.number),
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
    monitor = tracking.system_monitor(
        run_id, spec.search.system_metrics_interval, ctx.opts.tracking()
    )
    try:
        seed_everything(config.seed)
        model = tasks.build(config, data, pretrained)
        resume = None
        if resume_from is not None:
            resume = resume_state.load_state_file(resume_from)
            for epoch, m in enumerate(resume["history"], 1):  # the pruner sees the whole curve
                if not multi:
                    trial.report(m[spec.objective.metric], epoch)
            end_tags["harness.resumed_from_epoch"] = resume["epoch"]
        callbacks = [
            logger,
            TrialWatch(trial, resume_file, logger),
            pruner,
            ctx.progress.epoch_line(trial.number, config.epochs, KINDS[config.task.kind].headline),
        ]
        cache = datacache.under(ctx.opts.results)  # where ranks 1..K-1 load the data from
        result = tasks.train(config, model, data, callbacks, resume=resume, cache_dir=cache)
        if spec.search.keep_checkpoints != "none":
            atomic_write(
                best_weights_path(ctx.opts.results, ctx.study_name, trial.number),
                lambda f: torch.save(result.best_state, f),
            )
        for k in KINDS[config.task.kind].summary:
            trial.set_user_attr(k, result.best[k])
        trial.set_user_attr("best_epoch", result.best_epoch)
        trial.set_user_attr("epochs_run", len(result.history))
        trial.set_user_attr("seconds", round(result.seconds, 3))
        end_tags["harness.best_epoch"] = result.best_epoch
        names = (*spec.objective.all_metrics, *KINDS[config.task.kind].summary)
        end_metrics = runs.chosen_epoch_metrics(result, dict.fromkeys(names))
        state = "COMPLETE"
        if multi:
            return tuple(result.best[m] for m in spec.objective.metrics)
        return result.best[spec.objective.metric]
    except optuna.TrialPruned:
        state = "PRUNED"
        end_tags["harness.pruned_epoch"] = pruner.pruned_at
        end_tags[tracking.DESCRIPTION] = (
            f"Pruned at epoch {pruner.pruned_at} by Optuna's {type(trial.study.pruner).__name__}: "
            f"its {spec.objective.metric} was not promising against the other trials at that "
            "epoch. A finished decision of the search, not a failure (optuna.state=PRUNED)."
        )
        trial.set_user_attr("harness.pruned_epoch", pruner.pruned_at)
        trial.set_user_attr("epochs_run", pruner.pruned_at)
        raise
    except (Interrupted, envfaults.EnvironmentStop) as err:
        status = "KILLED"
        _leave_for_retry(err, end_tags)
        raise
    except Exception as err:
        fault = envfaults.disk_full(err, ctx.opts.results)
        if fault is not None:  # a full disk: not the trial's fault
            status, stop = "KILLED", envfaults.EnvironmentStop(fault)
            _leave_for_retry(stop, end_tags)
            raise stop from err
        end_tags["harness.error"] = f"{type(err).__name__}: {err}"[:5000]
        end_tags["harness.fault"] = fault_kind(err)
        trial.set_user_attr("harness.error", end_tags["harness.error"][:500])
        trial.set_user_attr("harness.fault", end_tags["harness.fault"])
        tracking.log_text(ctx.client, run_id, traceback.format_exc(), "traceback.txt")
        raise
    finally:  # the run ends with the trial's true state, whatever happened
        ending = time.perf_counter()
        monitor.finish()
        stopping = isinstance(sys.exc_info()[1], envfaults.EnvironmentStop)
        with envfaults.while_stopping(stopping):  # a store still away: the next start mends it
            runs.end(
                run,
                status or tracking.STATUS[state],
                {"optuna.state": state, **end_tags},
                end_metrics,
            )
        if status != "KILLED":  # a finished or faulty attempt is not resumed: its state goes
            for number in (trial.number, retry_of):
                if number is not None:
                    resume_path(ctx.opts.results, ctx.study_name, number).unlink(missing_ok=True)
            # best weights of an attempt that is not COMPLETE (this one failing after writing
            # them, the attempt this one retried) are never retained: they go too
            for number in (retry_of, None if state == "COMPLETE" else trial.number):
                if number is not None:
                    best_weights_path(ctx.opts.results, ctx.study_name, number).unlink(
                        missing_ok=True
                    )
        done = time.perf_counter()
        cost = run.setup_seconds + logger.seconds + (done - ending)
        if not stopping:
            tracking.log_metrics_once(
                ctx.client,
                run_id,
                {"tracking_ms": 1000 * cost, "tracking_share": cost / max(done - started, 1e-9)},
            )


def _end_parent(client, parent: str, status: str) -> None:
    """End the study's parent run; when the process stops for the environment, one try (the
    next start reopens it anyway)."""
    with envfaults.while_stopping(isinstance(sys.exc_info()[1], envfaults.EnvironmentStop)):
        tracking.end_run(client, parent, status)


def first_config(spec: ExperimentSpec) -> TrialConfig:
    """The study's first trial: the baseline recipe, or the file's own values without one."""
    return baseline_config(spec) if spec.search.baseline else trial_config(spec, {})


# --- The study. ---
def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


@contextlib.contextmanager
def _stores_lock(results: Path):
    """Processes of this machine sharing a results folder initialise the stores in turn: a
    SQLite MLflow migration interrupted by a concurrent one leaves its temporary tables behind
    (`_alembic_tmp_latest_metrics already exists`) and no retry can mend that."""
    results.mkdir(parents=True, exist_ok=True)
    with open(results / ".stores.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _retry(make, what: str, attempts: int = 6):
    """Store initialisation, retried: several processes creating one fresh store at once
    collide (Optuna on PostgreSQL: UniqueViolation; MLflow on SQLite: alembic CommandError)."""
    for attempt in range(attempts):
        try:
            return make()
        except SpecError:
            raise
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * 2**attempt + 0.1 * (os.getpid() % 7))  # apart from the others


def _sampler_salt(opts: StudyOptions) -> int:
    """0 for the process that creates the study (a one-process study repeats under its seed);
    a spawned worker's index plus 1; a process that joins an existing study uses its pid."""
    if opts.worker:
        return 1 + int(os.environ.get("HARNESS_WORKER_INDEX", "0"))
    return 0


def _open_study(spec: ExperimentSpec, opts: StudyOptions, name: str, client, exp_id: str):
    storage = _retry(lambda: open_storage(opts.storage_url()), "the Optuna storage")
    sampler, pruner = make_sampler(spec, _sampler_salt(opts)), make_pruner(spec)
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=name,
            sampler=sampler,
            pruner=pruner,
            directions=list(spec.objective.all_directions),
        )
    except optuna.exceptions.DuplicatedStudyError:
        if not opts.worker:  # others may run this study now: propose other parameters
            sampler = make_sampler(spec, os.getpid())
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
        recorded = study.user_attrs.get("harness.spec_hash")
        if recorded != spec_hash(spec):
            raise SpecError(
                f"study {name!r} in {tracking.redact(opts.storage_url())} was made from a "
                "different experiment spec "
                f"(spec hash {recorded} vs {spec_hash(spec)}); give --study-name for a new study"
            ) from None
        parent = study.user_attrs.get("mlflow_parent_run_id")
        deadline = time.monotonic() + 60
        while parent is None and time.monotonic() < deadline:  # its creator is setting it up
            time.sleep(0.5)
            parent = optuna.load_study(study_name=name, storage=storage).user_attrs.get(
                "mlflow_parent_run_id"
            )
        if parent is None:
            raise RuntimeError(f"study {name!r} has no MLflow parent run after 60 s") from None
        return study, parent, False
    study.set_user_attr("harness.spec_hash", spec_hash(spec))
    study.set_user_attr("harness.experiment", spec.name)
    study.set_user_attr("harness.objectives", list(spec.objective.all_metrics))
    with warnings.catch_warnings():  # experimental in Optuna 5: the names dashboards show
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(spec.objective.all_metrics))
    study.set_user_attr("harness.task_kind", spec.task.kind)
    if spec.search.baseline:
        study.enqueue_trial({}, user_attrs={"harness.baseline": True})
    for values in spec.search.enqueue:
        study.enqueue_trial(dict(values))
    settings = {
        "study.name": name,
        "study.storage": tracking.redact(opts.storage_url()),
        "search.sampler": spec.search.sampler,
        "search.pruner": spec.search.pruner,
        "search.space": tracking.yaml_text(
            spec.model_dump(mode="json", by_alias=True)["search"]["space"]
        ),
        "objective": ", ".join(
            f"{d} {m}"
            for m, d in zip(spec.objective.all_metrics, spec.objective.all_directions, strict=True)
        ),
    }
    parent = tracking.create_parent_run(client, exp_id, name, settings)
    study.set_user_attr("mlflow_parent_run_id", parent)
    return study, parent, True


def _note_moved(note: str | None) -> None:
    if note:
        print(f"note: {note}.", file=sys.stderr, flush=True)


def _preflight(ctx: _Context, config: TrialConfig) -> None:
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


def _space_needed(spec: ExperimentSpec, trials: int, model_bytes: int, workers: int) -> int:
    """What a study of `trials` more trials will keep in its results folder, roughly: the kept
    best weights (a local file and its MLflow copy each), each running trial's resume state
    (weights, optimizer state, anchors) and best-weights file, the stores' rows, the report."""
    search = spec.search
    kept = {"all": trials, "none": 0}.get(search.keep_checkpoints, search.top_k + 1)
    per_trial_rows = 64 * 1024  # MLflow's params, tags, metrics; Optuna's journal
    running = workers * 5 * model_bytes
    return 2 * kept * model_bytes + running + trials * per_trial_rows + 4 * 2**20


def report_study(opts: StudyOptions, seeds: int = 0, ablate: bool = False) -> report.Summary:
    """The report of an existing study, found by name in the storage (`run_study.py report`)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = opts.storage_url()
    if "://" not in url and not Path(url).is_file():
        raise SpecError(f"no Optuna journal at {url}: give --results or --storage of the study")
    storage = open_storage(url)
    names = [
        s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
    ]
    if opts.study_name not in names:
        raise SpecError(
            f"no study {opts.study_name!r} in {tracking.redact(opts.storage_url())} "
            f"(studies there: {', '.join(names) or 'none'})"
        )
    study = optuna.load_study(study_name=opts.study_name, storage=storage)
    _note_moved(relocation.relocate(opts.results, opts.tracking()))
    client = tracking.connect(opts.tracking())
    return finish_report(study, opts, opts.study_name, client, seeds=seeds, ablate=ablate)


def run_study(spec: ExperimentSpec, opts: StudyOptions) -> report.Summary:
    """Create or resume the study and run it to its budget of finished trials (or the timeout)."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own lines say what failed
    first = first_config(spec)
    inputs.check_inputs(
        spec, opts, first
    )  # bad weights names, files and model URIs: before any store
    # bad data settings fail before any store; an image folder is decoded (once) before workers
    base_data = tasks.load_data(first, datacache.under(opts.results))
    inputs.check_inputs(spec, opts, first, weights_files=True)
    opts.results.mkdir(parents=True, exist_ok=True)
    name = opts.study_name or spec.name
    target = opts.n_trials or spec.search.n_trials
    if spec.search.sampler == "grid":  # a grid point runs once
        target = min(target, grid_points(spec) + int(spec.search.baseline))
    with _stores_lock(opts.results):
        _note_moved(relocation.relocate(opts.results, opts.tracking()))
        client = _retry(lambda: tracking.connect(opts.tracking()), "the MLflow store")
        exp_id = _retry(
            lambda: tracking.experiment_id(client, spec.name, opts.results, opts.tracking()),
            "the MLflow experiment",
        )
    notes = report.Progress(total=target, done=0, quiet=opts.quiet, bar=False)
    ctx = _Context(spec, opts, name, runs.Resources(opts.results, client, exp_id), "", notes)
    ctx.res.note = lambda text: ctx.progress.note(text)  # the progress line of the moment
    ctx.res.data[runs.data_key(first)] = base_data
    model_bytes = _preflight(ctx, first)
    for line in base_data.report.lines():
        notes.note(line)
    with _stores_lock(opts.results):
        study, parent, created = _open_study(spec, opts, name, client, exp_id)
    done = finished_count(study)
    if not opts.worker and done < target:  # before the first trial: will it fit?
        n_workers = workers.worker_count(
            opts.workers or "1", workers.visible_gpus(), spec.train.devices_per_trial
        )
        need = _space_needed(spec, target - done, model_bytes, n_workers)
        warning = envfaults.check_space(opts.results, need)
        if warning:
            print(warning, file=sys.stderr, flush=True)
    progress = report.Progress(total=target, done=done, quiet=opts.quiet)
    ctx.parent_run_id, ctx.progress = parent, progress
    if done >= target:
        progress.close()
        print(
            f"Study {name!r} is done: {done} finished trials, budget {target}. "
            f"Give a larger --n-trials to extend it."
        )
        return finish_report(study, opts, name, client)
    if opts.workers and not opts.worker:
        k = spec.train.devices_per_trial
        n = workers.worker_count(opts.workers, workers.visible_gpus(), k)
        if n > 1:
            return _run_workers(study, opts, name, n, client, parent, progress, k)
    if opts.worker:
        retried = reconcile(study, client, name, results=opts.results)
    elif not created:
        tracking.reopen_run(client, parent)
        retried = reconcile(study, client, name, results=opts.results)
        progress.note(f"Resuming study {name!r}: {done} of {target} trials finished.")
        if retried:
            progress.note(f"Trials {retried} were left running by a dead process: re-queued.")
    deadline = None if opts.timeout is None else time.monotonic() + opts.timeout
    budget = ExactBudget(target)
    same_error = SameFailure()
    status = "FINISHED"
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            handlers[sig] = signal.signal(sig, raise_interrupted)
    try:
        while done < target:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            study.optimize(
                lambda t: _attempt(ctx, t),
                n_trials=target - done,
                timeout=left,
                callbacks=[
                    budget,
                    lambda st, _t: retention.apply_retention(ctx, st),
                    lambda st, _t: reconcile(st, client, name, quick=True),  # a dead worker's
                    progress.on_trial_end,
                    same_error,
                ],
                catch=(Exception,),
            )
            now = finished_count(study)
            if budget.reached:  # with the trials other workers are finishing
                break
            if same_error.tripped:
                progress.note(
                    f"The last {same_error.limit} trials failed with the same error, "
                    f"{same_error.tripped[:300]}; stopping. See their FAILED runs."
                )
                status = "FAILED"
                break
            if now == done:  # every trial of the round failed: stop instead of looping
                progress.note("Every trial of this round failed; stopping. See the FAILED runs.")
                status = "FAILED"
                break
            done = now
    except BaseException as err:
        status = "KILLED"
        stop = envfaults.stop_in(err)  # Optuna may have raised its own error over it
        if stop is not None and stop is not err:
            raise stop from None
        raise
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        progress.close()
        if not opts.worker:
            _end_parent(client, parent, status)
    if opts.worker:  # the process that spawned the workers reports, once
        return summarize(study, opts, name)
    others = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    if others:  # other nodes still run trials of this study: the last one to end reports
        print(
            f"Trials {others} still run elsewhere; the node that finishes last writes the report."
        )
        return summarize(study, opts, name)
    return finish_report(study, opts, name, client)


def _run_workers(study, opts, name, n, client, parent, progress, k=1) -> report.Summary:
    """Spawn `n` workers of the study (a group of `k` GPUs each, an even share of the CPU
    threads), show the whole study's progress while they run, and report once when they are
    done."""
    envs = workers.assign(n, workers.visible_gpus(), os.cpu_count() or 1, k)
    tracking.reopen_run(client, parent)
    reconcile(study, client, name, results=opts.results)
    logs = opts.results / "logs" / safe_name(name)
    progress.note(f"{n} workers of study {name!r}; their logs: {logs}")
    procs = workers.spawn(list(opts.argv), envs, logs)
    status = "FINISHED"
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(1.0)
            progress.set_done(finished_count(study), study)
    except BaseException:
        status = "KILLED"
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=60)
        raise
    finally:
        progress.set_done(finished_count(study), study)
        progress.close()
        codes = [p.returncode for p in procs]
        if envfaults.EXIT_TEMPFAIL in codes:  # a worker stopped for the environment: so do we
            status = "KILLED"
            _end_parent(client, parent, status)
            raise envfaults.EnvironmentStop.of_workers(codes, logs)
        if any(c != 0 for c in codes):
            progress.note(f"workers ended with exit codes {codes}; see {logs}")
            if status == "FINISHED" and finished_count(study) < progress.total:
                status = "FAILED"  # a lost worker is fine while the others reach the budget
        tracking.end_run(client, parent, status)
    return finish_report(study, opts, name, client)
