"""One tracked-run lifecycle for every run that trains: a study's trial, a seed re-run, a
reproduction. Each is started here (its tags: provenance, then the caller's), described (the
params of the sections its task kind uses, the whole resolved config as `config.yaml`), logged
(an epoch logger the core calls back) and ended with its true status; `load_config` reads a
run's config back. `Resources` is what such runs share in one process: the data splits, the
starting weights and the source model, each loaded once.

Knows no Optuna; MLflow only through `harness.tracking.store`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.config.load import parse_yaml
from harness.config.metrics import KINDS, best_name
from harness.config.spec import (
    META_TRAIN_KEYS,
    SECTIONS,
    SpecError,
    TrialConfig,
    flatten,
    safe_name,
)
from harness.config.tags import Tag
from harness.core import distributed, models, tasks
from harness.core.shared import resolve_device, seed_everything
from harness.core.source import SourceModel, get_source_model, source_key
from harness.data import datacache
from harness.data.datasets import TaskData
from harness.tracking import provenance as where_from
from harness.tracking import registry
from harness.tracking import store as tracking


@dataclass(frozen=True)
class StudyOptions:
    results: Path
    storage: str | None = None  # default: RESULTS/optuna.journal
    tracking_uri: str | None = None  # default: sqlite:///RESULTS/mlflow.db
    study_name: str | None = None  # default: the experiment's name
    n_trials: int | None = (
        None  # default: the file's search.n_trials (a total, not a count per run)
    )
    timeout: float | None = None
    quiet: bool = False
    workers: str | None = None  # N or auto: this process spawns N workers of the study
    worker: bool = False  # a spawned worker: it runs trials; the spawner reports
    argv: tuple[str, ...] = ()  # the command line, for the spawned workers
    heartbeat_grace: float | None = None  # RDB storages: a dead node's trial, retried after

    def shared(self) -> bool:
        """Shared stores (an RDB storage and a tracking server): every node reaches the
        resume states, in the trial runs' artifacts."""
        return "://" in self.storage_url() and not tracking.is_local_store(self.tracking())

    def storage_url(self) -> str:
        return self.storage or str(self.results / "optuna.journal")

    def tracking(self) -> str:
        return self.tracking_uri or tracking.default_tracking_uri(self.results)


def params(config: TrialConfig) -> dict[str, Any]:
    """The run's params: name, seed and the sections its task kind uses, flattened."""
    tree = config.model_dump(mode="json")
    shown = {"name": tree["name"], "seed": tree["seed"]}
    shown |= {k: tree[k] for k in SECTIONS[config.task.kind]}
    if config.task.kind == "meta":
        shown["train"] = {k: tree["train"][k] for k in META_TRAIN_KEYS}
    return flatten(shown)


def provenance(config: TrialConfig) -> dict[str, str]:
    """Code, libraries, device and CPU threads of a run of `config` in this process; with
    `train.devices_per_trial` K > 1, the threads of each rank, and K
    (`harness.devices_per_trial`, also a param: `reproduce` re-runs on K devices)."""
    k = config.train.devices_per_trial
    threads = config.train.threads or torch.get_num_threads()
    if k > 1:
        threads = distributed.rank_threads(config)
    tags = where_from.provenance_tags(str(resolve_device(config.train.device)), threads)
    return {**tags, Tag.DEVICES_PER_TRIAL: str(k)}


@dataclass
class TrackedRun:
    client: Any
    run_id: str
    logger: tracking.EpochLogger  # a core callback: each epoch's metrics, step = epoch
    setup_seconds: float  # creating the run, its params, tags and config.yaml


def start(
    client,
    exp_id: str,
    run_name: str,
    config: TrialConfig,
    tags: dict[str, str],
    synchronous: bool = True,
    flush_seconds: float = 0.0,
) -> TrackedRun:
    """Create the run with `tags`, the params of `config` (written by its logger: with its
    first batch, at most `flush_seconds` after the start) and its `config.yaml`."""
    started = time.perf_counter()
    text = tracking.yaml_text(config.model_dump(mode="json"))
    run_id = tracking.create_run(client, exp_id, run_name, tags, {}, {"config.yaml": text})
    logger = tracking.EpochLogger(client, run_id, synchronous, flush_seconds, params(config))
    return TrackedRun(client, run_id, logger, time.perf_counter() - started)


def end(
    run: TrackedRun,
    status: str,
    tags: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
) -> None:
    """Tag the run, log its final `metrics` and the epochs its logger still holds (one write),
    end it with `status` (FINISHED, FAILED, KILLED)."""
    run.logger.end_run(status, tags or {}, metrics)


def chosen_epoch_metrics(result, metric_names) -> dict[str, float]:
    """What a finished run shows in the UI's table: each named metric at the epoch the run
    chose (`best_<metric>`), and that epoch (`best_epoch`); the curves keep every epoch."""
    out = {best_name(k): result.best[k] for k in metric_names if k in result.best}
    out["best_epoch"] = float(result.best_epoch)
    return out


@contextlib.contextmanager
def tracked(
    client, exp_id: str, run_name: str, config: TrialConfig, tags: dict[str, str]
) -> Iterator[tuple[TrackedRun, dict[str, Any]]]:
    """`start`, then the body trains; the run ends FINISHED when the body returns, KILLED on
    an interrupt, FAILED with `harness.error` on any other exception. The body may add end tags
    (and set `status`) in the dict it is given."""
    run = start(client, exp_id, run_name, config, tags)
    ending: dict[str, Any] = {}
    status = "FAILED"
    try:
        yield run, ending
        status = ending.pop("status", "FINISHED")
    except KeyboardInterrupt:
        status = "KILLED"
        ending[Tag.FAULT] = "interrupted"
        raise
    except Exception as err:
        ending[Tag.ERROR] = f"{type(err).__name__}: {err}"[:5000]
        raise
    finally:
        ending.pop("status", None)
        end(run, status, ending)


def retrain(
    res: Resources,
    parent: str,
    run_name: str,
    config: TrialConfig,
    start: Path | None,
    tags: dict[str, str],
    then: Callable | None = None,
) -> dict[str, float]:
    """Train `config` from the weights `start` as a tracked run under `parent` (a seed re-run,
    an ablation variant): tagged with provenance, the data hash and `tags`. Logs and returns
    `best_<metric>` of the kind's headline metrics, and what `then(model, data)` measures on
    the best epoch's weights."""
    data = res.data_for(config)
    tags = {**provenance(config), Tag.PARENT_RUN: parent, **tags}
    tags[Tag.DATA_HASH] = data.data_hash
    with tracked(res.client, res.exp_id, run_name, config, tags) as (run, _):
        seed_everything(config.seed)
        model = tasks.build(config, data, start)
        result = tasks.train(config, model, data, [run.logger])
        out = {best_name(k): result.best[k] for k in KINDS[config.task.kind].headline}
        if then is not None:
            model.load_state_dict(result.best_state)
            out |= then(model, data)
        tracking.log_metrics_once(res.client, run.run_id, out)
    return out


def log_soup(client, exp_id: str, run_name: str, config: TrialConfig, tags: dict, metrics) -> str:
    """A finished run for a model soup: `tags` (its ingredients, the parent), the soup's
    `metrics`, and `config.yaml` of its first ingredient (the architecture and data it shares
    with the others; its hyperparameters are the first ingredient's only)."""
    text = tracking.yaml_text(config.model_dump(mode="json"))
    flat = {"soup.kind": tags[Tag.SOUP], "soup.ingredients": tags[Tag.SOUP_INGREDIENTS]}
    run_id = tracking.create_run(client, exp_id, run_name, tags, flat, {"config.yaml": text})
    tracking.log_metrics_once(client, run_id, metrics)
    tracking.end_run(client, run_id, "FINISHED")
    return run_id


def load_config(run_id: str) -> TrialConfig:
    """The resolved config a run recorded (`config.yaml`), validated as it is now."""
    try:
        text = tracking.load_text(run_id, "config.yaml")
    except (tracking.TrackingError, OSError) as err:
        raise SpecError(f"run {run_id} has no readable config.yaml artifact: {err}") from None
    try:
        return TrialConfig.model_validate(parse_yaml(text))
    except ValueError as err:
        raise SpecError(f"run {run_id}: its config.yaml does not validate now: {err}") from None


def data_key(config: TrialConfig) -> tuple:
    """Trials with equal keys share their data (the split, or the meta-learning pool)."""
    size = models.data_size_hint(config)  # an image folder is loaded at the model's size
    if config.task.kind == "meta":
        return (config.data.model_dump_json(), "meta", config.meta.model_dump_json(), size)
    return (config.data.model_dump_json(), config.split_seed, size)


@dataclass
class Resources:
    """What the runs of one process share: data splits, starting weights, source models."""

    results: Path
    client: Any
    exp_id: str
    note: Callable[[str], None] = print
    data: dict[tuple, TaskData | tasks.MetaPool] = field(default_factory=dict)
    sources: dict[str, tuple[SourceModel, str]] = field(default_factory=dict)
    downloads: dict[str, tuple[Path, str]] = field(default_factory=dict)

    def data_for(self, config: TrialConfig) -> TaskData | tasks.MetaPool:
        key = data_key(config)
        if key not in self.data:
            self.data[key] = tasks.load_data(config, datacache.under(self.results))
        return self.data[key]

    def pretrained_for(self, config: TrialConfig) -> tuple[Path | None, str]:
        """The weights file a trial's model starts from (None: random init or torchvision's
        enum, loaded by the model builder), and a description of it for the run's tags."""
        m = config.model
        kind = m.pretrained_kind
        if kind == "none":
            return None, "none"
        if kind == "imagenet":
            return None, f"torchvision:{m.arch}.{m.weights}"
        if kind == "source":
            src, uri = self.source_for(config)
            return src.path, uri
        if kind == "file":
            path = Path(m.pretrained)
            if not path.is_file():
                raise SpecError(f"model.pretrained: no such state_dict file {path}")
            return path, str(path.resolve())
        if m.pretrained not in self.downloads:  # an alias is pinned to its version once
            pinned = registry.pin_model_uri(m.pretrained)
            folder = self.results / "pretrained" / safe_name(pinned)
            self.downloads[m.pretrained] = (registry.resolve_model_uri(pinned, folder), pinned)
        return self.downloads[m.pretrained]

    def source_for(self, config: TrialConfig) -> tuple[SourceModel, str] | None:
        """The pretrained source model and its registry URI (trained once, then cached)."""
        if config.model.pretrained != "source":
            return None
        key = source_key(config)
        if key not in self.sources:
            self.note(f"source model {key}: looking in {self.results / 'sources'}")
            src = get_source_model(
                config,
                self.results / "sources",
                fetch=lambda k: registry.fetch_source_model(
                    self.client, k, self.results / "pretrained" / f"source-{k}"
                ),
                data_cache=datacache.under(self.results),
            )
            uri = registry.register_source_model(
                self.client, self.exp_id, src.key, src.path, src.settings, src.metrics
            )
            how = "trained now" if src.trained_now else "from the cache or the registry"
            self.note(
                f"source model {key} ({how}): source val_acc "
                f"{src.metrics['val_acc']:.4f}, registered as {uri}"
            )
            self.sources[key] = (src, uri)
        return self.sources[key]
