"""The study loop: the stores and the study opened (or resumed), the parent run, the total
budget of finished trials (with several workers too), and the study's end. The study layer is
Optuna's only home; its sampler and pruner are `space`, one trial attempt is `objective`.

One trial: sample (or take the baseline recipe) -> TrialConfig -> child MLflow run -> `fit`
with callbacks (metrics to MLflow, values to the pruner, progress) -> Optuna value and state.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from harness.config.load import grid_points, spec_hash
from harness.config.spec import ExperimentSpec, SpecError, safe_name
from harness.config.tags import Tag
from harness.core import tasks
from harness.data import datacache
from harness.infra import envfaults
from harness.reports import report
from harness.study import inputs, retention, warm, workers
from harness.study.finish import finish_report, summarize
from harness.study.objective import Context, end_parent, first_config, preflight, run_attempt
from harness.study.recovery import (
    FINISHED,
    SIGNALS,
    ExactBudget,
    SameFailure,
    raise_interrupted,
    reconcile,
)
from harness.study.space import make_pruner, make_sampler
from harness.study.storage import open_storage
from harness.tracking import relocation, runs
from harness.tracking import store as tracking
from harness.tracking.runs import StudyOptions

# --- Storages, samplers, pruners. ---


# --- Core callbacks owned by the study. ---


# --- The study. ---
def _optuna_logging(level: int) -> None:
    """Optuna's lines from `level` up go through the root logger, not its own terminal
    handler: into the results folder's library log where the command set one up
    (`harness.infra.logs`)."""
    optuna.logging.set_verbosity(level)
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()


def finished_count(study: optuna.Study) -> int:
    """The study's own finished trials (a warm start's are not its own: `report.own_trials`)."""
    return len(report.own_trials(study, FINISHED))


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


def _open_study(
    spec: ExperimentSpec,
    opts: StudyOptions,
    name: str,
    client,
    exp_id: str,
    data_hash: str | None = None,
    handover: warm.Handover | None = None,
):
    storage = _retry(
        lambda: open_storage(opts.storage_url(), opts.heartbeat_grace), "the Optuna storage"
    )
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
        recorded = study.user_attrs.get(Tag.SPEC_HASH)
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
    study.set_user_attr(Tag.SPEC_HASH, spec_hash(spec))
    study.set_user_attr(Tag.EXPERIMENT, spec.name)
    study.set_user_attr(Tag.OBJECTIVES, list(spec.objective.all_metrics))
    with warnings.catch_warnings():  # experimental in Optuna 5: the names dashboards show
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(spec.objective.all_metrics))
    study.set_user_attr(Tag.TASK_KIND, spec.task.kind)
    if data_hash:  # what a later warm start or comparison checks its data against
        study.set_user_attr(Tag.DATA_HASH, data_hash)
    study.set_user_attr(
        Tag.SOUP_PLAN,
        {
            "kind": spec.soup if spec.search.keep_checkpoints != "none" else "none",
            "candidates": spec.search.soup_candidates,
            "keep": spec.search.keep_checkpoints,
            "top_k": spec.search.top_k,
        },
    )
    if spec.search.baseline:
        study.enqueue_trial({}, user_attrs={Tag.BASELINE: True})
    for values in spec.search.enqueue:
        study.enqueue_trial(dict(values))
    tags = {}
    if handover is not None:  # after the queued trials: the baseline stays trial 0
        study.add_trials(handover.trials)
        study.set_user_attr(Tag.WARM_START_FROM, handover.sources)
        tags[Tag.WARM_START_FROM] = warm.named(handover.sources)
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
    parent = tracking.create_parent_run(client, exp_id, name, settings, tags)
    study.set_user_attr("mlflow_parent_run_id", parent)
    return study, parent, True


def _note_moved(note: str | None) -> None:
    if note:
        print(f"note: {note}.", file=sys.stderr, flush=True)


def _space_needed(spec: ExperimentSpec, trials: int, model_bytes: int, workers: int) -> int:
    """What a study of `trials` more trials will keep in its results folder, roughly: the kept
    best weights (a local file and its MLflow copy each), each running trial's resume state
    (weights, optimizer state, anchors) and best-weights file, the stores' rows, the report."""
    search = spec.search
    soup_k = search.soup_candidates if spec.soup != "none" else 0
    kept = {"all": trials, "none": 0}.get(search.keep_checkpoints, max(search.top_k, soup_k) + 1)
    per_trial_rows = 64 * 1024  # MLflow's params, tags, metrics; Optuna's journal
    running = workers * 5 * model_bytes
    return 2 * kept * model_bytes + running + trials * per_trial_rows + 4 * 2**20


def report_study(
    opts: StudyOptions, seeds: int = 0, ablate: bool = False, soup: bool = False
) -> report.Summary:
    """The report of an existing study, found by name in the storage (`run_study.py report`)."""
    _optuna_logging(optuna.logging.WARNING)
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
    return finish_report(
        study, opts, opts.study_name, client, seeds=seeds, ablate=ablate, soup=soup
    )


def run_study(spec: ExperimentSpec, opts: StudyOptions) -> report.Summary:
    """Create or resume the study and run it to its budget of finished trials (or the timeout)."""
    _optuna_logging(optuna.logging.ERROR)  # our own lines say what failed
    first = first_config(spec)
    # the earlier studies of a warm start: read and checked before anything is created
    handover = warm.gather(spec, opts) if spec.search.warm_start else None
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
    ctx = Context(spec, opts, name, runs.Resources(opts.results, client, exp_id), "", notes)
    ctx.res.note = lambda text: ctx.progress.note(text)  # the progress line of the moment
    ctx.res.data[runs.data_key(first)] = base_data
    model_bytes = preflight(ctx, first)
    for line in base_data.report.lines():
        notes.note(line)
    with _stores_lock(opts.results):
        study, parent, created = _open_study(
            spec, opts, name, client, exp_id, base_data.data_hash, handover
        )
    if handover is not None and not opts.worker:
        if created:  # said even with --quiet: what the study starts from
            print(handover.line(), flush=True)
            for line in warm.data_notes(handover.sources, base_data.data_hash):
                print(f"warm start: {line}", flush=True)
        else:
            notes.note(
                f"warm start: study {name!r} exists; a warm start applies when a study is "
                "created, nothing more handed over"
            )
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
        with _stores_lock(opts.results):  # as at a study's end: reports in turn
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
        for sig in SIGNALS:
            handlers[sig] = signal.signal(sig, raise_interrupted)
    try:
        while done < target:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            study.optimize(
                lambda t: run_attempt(ctx, t),
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
            end_parent(client, parent, status)
    if opts.worker:  # the process that spawned the workers reports, once
        return summarize(study, opts, name)
    # processes of this machine that end together report in turn: the later one reuses what
    # the first made (tests, model versions, soups), none reads a run the other holds open
    with _stores_lock(opts.results):
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if running:  # other nodes still run trials of this study: the last one to end reports
            others = [t.number for t in running]
            print(
                f"Trials {others} still run elsewhere; the node that finishes last writes the "
                "report."
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
            end_parent(client, parent, status)
            raise envfaults.EnvironmentStop.of_workers(codes, logs)
        if any(c != 0 for c in codes):
            progress.note(f"workers ended with exit codes {codes}; see {logs}")
            if status == "FINISHED" and finished_count(study) < progress.total:
                status = "FAILED"  # a lost worker is fine while the others reach the budget
        tracking.end_run(client, parent, status)
    return finish_report(study, opts, name, client)
