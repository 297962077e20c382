"""Re-run one trial from its MLflow record alone and compare its per-epoch metrics
(`run_study.py reproduce RUN_ID`).

The record gives everything: the resolved `config.yaml` (seed included), the data split's hash
(`harness.data_hash`, checked before anything runs), the CPU thread count (`harness.threads`:
CPU results differ between thread counts, each repeatable), the device (`harness.device`), the
starting weights (`harness.pretrained`) and, for a pruned trial, the epoch it stopped at
(`harness.pruned_epoch`). The re-run is a new run beside the trial's (same experiment, same
parent), tagged `harness.reproduces=RUN_ID` and `harness.role=reproduce`. The verdict
(`harness.reproduce_result`) is `match` (bit for bit), `within_tolerance` or `differs`: in the
recorded environment (CPU model, threads, torch version, device) a CPU re-run must match bit
for bit and a GPU one within `GPU_TOLERANCE`; elsewhere within `cross_machine_tolerance`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import TextIO

from harness.config.metrics import KINDS, OPTIONAL_EPOCH, multitask_epoch
from harness.config.spec import SpecError, TrialConfig, safe_name
from harness.config.tags import Tag
from harness.core import checkpoints, distributed
from harness.core.source import source_key
from harness.data import datacache
from harness.reports.tolerance import (
    EXACT,
    GPU_TOLERANCE,
    Outcome,
    compare,
    cross_machine_tolerance,
    environment,
    same_environment,
)
from harness.tracking import provenance, registry, relocation, runs
from harness.tracking import store as tracking

OPTIONAL = OPTIONAL_EPOCH  # compared where the record or the re-run has them


def compared_keys(config: TrialConfig) -> tuple[str, ...]:
    """The per-epoch metrics of the trial's core that a reproduction must match."""
    if config.task.kind == "multitask":
        names = ["target", *config.multitask.tasks]
        return multitask_epoch(names, config.multitask.weighting == "uncertainty")
    return KINDS[config.task.kind].epoch


CUBLAS_WORKSPACE = ":4096:8"


def warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


def recorded_histories(client, run, keys: list[str]) -> dict[str, dict[int, float]]:
    """{metric: {epoch: value}} of the trial's record. A trial that resumed an interrupted
    attempt (`harness.resumed_from_epoch`) logged only the later epochs: the earlier ones come
    from the attempt it retried (`harness.retry_of`)."""
    out = tracking.metric_steps(client, run.info.run_id, keys)
    tags = run.data.tags
    for _ in range(100):  # a chain of retries
        if not tags.get(Tag.RETRY_OF) or Tag.RESUMED_FROM_EPOCH not in tags:
            break
        upto = int(tags[Tag.RESUMED_FROM_EPOCH])
        previous = tracking.find_run(client, tags[Tag.RETRY_OF])
        if previous is None:
            break
        for key, history in tracking.metric_steps(client, previous.info.run_id, keys).items():
            for step, value in history.items():
                if step <= upto:
                    out.setdefault(key, {}).setdefault(step, value)
        tags = previous.data.tags
    return out


class _Recorder:
    """Core callback: keeps every epoch's metrics."""

    def __init__(self):
        self.history: list[dict[str, float]] = []

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.history.append(dict(metrics))


class _Stop(Exception):
    pass


class _StopAt:
    """Core callback: ends the fit after `epoch` (where the recorded trial was pruned)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        if epoch >= self.epoch:
            raise _Stop(epoch)


def _store_exists(uri: str) -> bool:
    """False only for a local SQLite store whose file is missing (it would be created empty)."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).is_file()
    return True


def _trial_run(client, run_id: str, uri: str):
    run = tracking.find_run(client, run_id)
    if run is None:
        raise SpecError(f"no MLflow run {run_id!r} in {tracking.redact(uri)}")
    tags = run.data.tags
    if Tag.OPTUNA_TRIAL_NUMBER not in tags:
        role = tags.get(Tag.ROLE, "unknown")
        raise SpecError(
            f"run {run_id} is not a trial run (harness.role={role}); give the run id of a "
            "trial (the Optuna user attribute mlflow_run_id, or a trial-N run in the MLflow UI)."
        )
    state = tags.get(Tag.OPTUNA_STATE)
    if state not in ("COMPLETE", "PRUNED"):
        why = f"its trial state is {state}" if state else "its trial is running or was cut off"
        raise SpecError(f"run {run_id}: {why}; only COMPLETE and PRUNED trials are reproduced")
    return run


def _provenance_warnings(recorded: dict[str, str], now: dict[str, str]) -> None:
    """Warn where code, libraries or hardware differ from the record."""
    for key in (Tag.GIT_COMMIT, *sorted(k for k in now if k.startswith(Tag.VERSION))):
        was, is_ = recorded.get(key), now.get(key)
        if was is None:
            warn(f"the record has no {key} tag (now {is_})")
        elif was != is_:
            what = "code" if key == Tag.GIT_COMMIT else key.removeprefix(Tag.VERSION)
            warn(f"{what} differs from the record: {key} was {was}, is {is_}")
    if recorded.get(Tag.GIT_DIRTY) == "true":
        warn("the recorded trial ran with uncommitted changes: its commit does not pin its code")
    if now.get(Tag.GIT_DIRTY) == "true":
        warn("this checkout has uncommitted changes")
    for key in (Tag.DEVICE, Tag.CPU):
        if recorded.get(key) and recorded.get(key) != now.get(key):
            warn(f"{key} differs from the record: was {recorded[key]}, is {now.get(key)}")


def _starting_weights(
    res: runs.Resources, config: TrialConfig, recorded: str | None
) -> tuple[Path | None, str]:
    """What `Resources.pretrained_for` gives, but a state_dict file at the recorded absolute
    path first, and a source model missing from the results folder's cache downloaded from the
    recorded registry version (the exact bits) before it would be pretrained again."""
    kind = config.model.pretrained_kind
    if kind == "file" and recorded and Path(recorded).is_file():
        return Path(recorded), recorded
    if kind == "mlflow" and recorded and recorded.startswith("models:/"):  # the pinned version
        return registry.resolve_model_uri(
            recorded, res.results / "pretrained" / safe_name(recorded)
        ), recorded
    if kind == "source" and recorded and recorded.startswith("models:/"):
        key, cache = source_key(config), res.results / "sources"
        if not checkpoints.source_cached(cache, key):
            folder = res.results / "pretrained" / safe_name(recorded)
            with contextlib.suppress(ValueError):  # not in this registry: pretrained again
                return registry.resolve_model_uri(recorded, folder), recorded
    return res.pretrained_for(config)


def _smallest_set(config: TrialConfig, data) -> int:
    """The fewest examples an accuracy of this trial is measured over each epoch."""
    if config.task.kind == "meta":
        m = config.meta
        return (m.eval_ways or m.ways) * (m.eval_queries or m.queries)
    n_train = min(len(data.y_train), config.data.eval_train_max)
    return max(1, min(n_train, len(data.y_val)))


def _deterministic_cuda() -> tuple[bool, bool]:
    """CUBLAS_WORKSPACE_CONFIG and deterministic algorithms, before CUDA starts; the previous
    (deterministic, warn_only) settings."""
    import torch

    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    if torch.cuda.is_initialized() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        warn("CUDA started before CUBLAS_WORKSPACE_CONFIG was set: cuBLAS may not repeat")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    # warn_only: an op with no deterministic CUDA kernel warns (naming itself) instead of failing
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    return before


def reproduce(run_id: str, opts, out: TextIO | None = None) -> Outcome:
    """Re-run trial run `run_id` of the stores `opts` (a StudyOptions) names and compare.

    Raises SpecError (exit 2) for an unknown or unsuitable run and a data split whose hash
    differs from the record; prints the start, warnings on stderr, and returns the Outcome.
    """
    out = out or sys.stdout
    import torch

    from harness.core import tasks
    from harness.core.shared import seed_everything
    from harness.data.sources import DataError

    uri = opts.tracking()
    if not _store_exists(uri):  # before connecting, which would create an empty one
        raise SpecError(
            f"no MLflow store at {tracking.redact(uri)}: give --results or --tracking-uri"
        )
    moved = relocation.relocate(opts.results, uri)
    if moved:
        warn(moved)
    client = tracking.connect(uri)
    run = _trial_run(client, run_id, uri)
    tags = run.data.tags
    config = runs.load_config(run_id)

    device_tag = tags.get(Tag.DEVICE, "cpu")
    gpu = device_tag.startswith("cuda")
    device = "cuda" if gpu else "cpu"  # as recorded, whatever `auto` would pick here
    config = config.model_copy(update={"train": config.train.model_copy(update={"device": device})})
    if Tag.THREADS in tags:
        threads = int(tags[Tag.THREADS])
    else:
        threads = config.train.threads or torch.get_num_threads()
        warn(f"the record has no harness.threads tag; using {threads} threads")
    k = config.train.devices_per_trial  # a data-parallel trial re-runs on as many devices
    if k > 1:  # harness.threads is then each rank's
        config = config.model_copy(
            update={"train": config.train.model_copy(update={"threads": threads})}
        )
        distributed.check_devices(
            config, f"run {run_id} ran on {k} devices (train.devices_per_trial); it cannot here"
        )
    keys = compared_keys(config)
    recorded = recorded_histories(client, run, [*keys, *OPTIONAL])
    pruned_epoch = None
    if tags.get(Tag.OPTUNA_STATE) == "PRUNED":  # compared up to the pruning epoch
        pruned = tags.get(Tag.PRUNED_EPOCH, "")
        last = max((max(h) for h in recorded.values() if h), default=1)
        pruned_epoch = int(pruned) if pruned.isdigit() else last
    epochs = pruned_epoch or config.epochs

    old_threads = torch.get_num_threads()
    old_deterministic = _deterministic_cuda() if gpu else None  # before CUDA starts
    try:
        if gpu and not torch.cuda.is_available():
            raise SpecError(f"run {run_id} ran on {device_tag}; no CUDA device is visible here")
        torch.set_num_threads(threads)
        try:
            data = tasks.load_data(config, datacache.under(opts.results))
        except DataError as err:
            raise SpecError(f"run {run_id}: data: {err}") from None
        recorded_hash = tags.get(Tag.DATA_HASH)
        if recorded_hash is None:
            warn("the record has no harness.data_hash tag: the data split cannot be checked")
        elif recorded_hash != data.data_hash:
            raise SpecError(
                f"run {run_id}: the data split differs from the record (data hash "
                f"{recorded_hash} recorded, {data.data_hash} now); refusing to compare"
            )
        now = {**provenance.provenance_tags(device, threads), Tag.DEVICES_PER_TRIAL: str(k)}
        _provenance_warnings(tags, now)
        if same_environment(tags, now):
            tolerance = GPU_TOLERANCE if gpu else EXACT
        else:
            tolerance = cross_machine_tolerance(_smallest_set(config, data), gpu)
        res = runs.Resources(opts.results, client, run.info.experiment_id, note=lambda _: None)
        start, start_desc = _starting_weights(res, config, tags.get(Tag.PRETRAINED))
        if tags.get(Tag.PRETRAINED) not in (None, start_desc):
            warn(
                f"starting weights differ from the record: harness.pretrained was "
                f"{tags[Tag.PRETRAINED]}, is {start_desc}"
            )
        trial = tags[Tag.OPTUNA_TRIAL_NUMBER]
        print(
            f"Reproducing trial {trial} of study {tags.get(Tag.OPTUNA_STUDY, '?')} (run {run_id}): "
            f"{epochs} epochs{' (pruned there)' if pruned_epoch else ''} on {device}"
            f"{f' x {k} data-parallel ranks' if k > 1 else ''}, "
            f"{threads} CPU threads, seed {config.seed}, data hash {data.data_hash}",
            file=out,
            flush=True,
        )
        new_tags = {**now, Tag.DATA_HASH: data.data_hash, Tag.PRETRAINED: start_desc}
        new_tags |= {Tag.REPRODUCES: run_id, Tag.ROLE: "reproduce"}
        if tags.get(Tag.PARENT_RUN):
            new_tags[Tag.PARENT_RUN] = tags[Tag.PARENT_RUN]
        name = f"reproduce-of-trial-{trial}"
        recorder = _Recorder()
        with runs.tracked(client, run.info.experiment_id, name, config, new_tags) as (new, end):
            callbacks = [recorder, new.logger, *([_StopAt(pruned_epoch)] if pruned_epoch else [])]
            seed_everything(config.seed)
            model = tasks.build(config, data, start)
            with contextlib.suppress(_Stop):
                tasks.train(config, model, data, callbacks, cache_dir=datacache.under(opts.results))
            rows = compare(recorded, recorder.history, epochs, tolerance, keys)
            outcome = Outcome(
                run_id,
                new.run_id,
                trial,
                epochs,
                pruned_epoch,
                tolerance,
                tuple(rows),
                recorded_on=environment(tags),
                rerun_on=environment(now),
            )
            end["status"] = "FINISHED" if outcome.matched else "FAILED"
            end[Tag.REPRODUCE_RESULT] = outcome.result
            end[Tag.REPRODUCE_TOLERANCE] = tolerance.describe()
            if outcome.result == "within_tolerance":
                worst = outcome.largest_relative_difference()[0]
                end[Tag.REPRODUCE_LARGEST_REL_DIFFERENCE] = f"{worst:.3g}"
            if not outcome.matched:
                end[Tag.REPRODUCE_FIRST_DIFFERENCE] = outcome.verdict()
            tracking.log_text(client, new.run_id, outcome.render() + "\n", "reproduce.txt")
        return outcome
    finally:
        torch.set_num_threads(old_threads)
        if old_deterministic is not None:
            torch.use_deterministic_algorithms(old_deterministic[0], warn_only=old_deterministic[1])
