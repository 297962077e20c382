"""The MLflow client and the records of a study: experiments, the study's parent run, one
child run per trial attempt, per-epoch metrics, artifacts, final statuses, and the queries of
finished runs. The tracking layer is MLflow's only home; the registry is `registry`, the
provenance tags `provenance`, the UI `ui`.

Uses MlflowClient with explicit run ids (no fluent active-run stack), so nothing depends on
process-global state. Run status follows the Optuna trial state: COMPLETE -> FINISHED,
PRUNED -> FINISHED (a pruner's decision is a finished trial, not a fault: the tag
`optuna.state=PRUNED`, `harness.pruned_epoch` and the run's description say so), FAIL ->
FAILED; an attempt interrupted (SIGTERM, a dead process) ends KILLED.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from harness.config.metrics import best_name
from harness.config.spec import SpecError
from harness.config.tags import Tag
from harness.infra import envfaults

STATUS = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED"}
TrackingError = mlflow.exceptions.MlflowException  # what the tracking store raises


def default_tracking_uri(results: Path) -> str:
    return f"sqlite:///{(results / 'mlflow.db').resolve()}"


def is_local_store(tracking_uri: str) -> bool:
    return not tracking_uri.startswith(("http://", "https://", "databricks"))


# MLflow's own HTTP retries (7 with backoff: about 4 silent minutes) are cut short: the
# harness retries every call itself for --retry-window, saying which store it waits for.
# pool_recycle renews the embedded store's connections before common idle timeouts (MLflow
# already pings each one before use).
_STORE_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
    "MLFLOW_SQLALCHEMYSTORE_POOL_RECYCLE": "240",
}


def connect(tracking_uri: str) -> MlflowClient:
    """A client of the tracking store whose every call is retried while the store is away
    (`envfaults.retrying`): an outage shorter than the window costs nothing."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for key, value in _STORE_ENV.items():
        os.environ.setdefault(key, value)
    for name in ("mlflow", "alembic"):  # store migrations and the like are not the user's news
        logging.getLogger(name).setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    calls = [n for n in dir(MlflowClient) if not n.startswith("_")]
    client = envfaults.wrap_methods(client, calls, **_store(tracking_uri))
    if not is_local_store(tracking_uri):
        _check_login(client, tracking_uri)
    return client


def _check_login(client: MlflowClient, tracking_uri: str) -> None:
    """A tracking server that refuses the login (MLflow's basic-auth app: the user and password
    come from MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, which the harness never
    logs, tags or prints) is the user's error, said in one line (exit 2), not an outage."""
    try:
        client.search_experiments(max_results=1)
    except mlflow.exceptions.MlflowException as err:
        status = err.get_http_status_code()
        if status not in envfaults.LOGIN_REFUSED:
            raise
        what = "refused the login" if status == 401 else "refused this user"
        raise SpecError(
            f"the MLflow tracking server {redact(tracking_uri)} {what} (HTTP {status}): set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user of that server "
            "with access to the experiment"
        ) from None


def _store(tracking_uri: str) -> dict[str, Any]:
    """How `envfaults.retrying` names the tracking store, whether it answers over HTTP, and
    the folder a local one writes to (named when its disk is full)."""
    folder = None
    if tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri.removeprefix("sqlite:///")).parent
    return {
        "store": f"the MLflow tracking store {redact(tracking_uri)}",
        "remote": not is_local_store(tracking_uri),
        "folder": folder,
    }


# The experiment's kind: MLflow's UI shows a "custom model development" experiment in its
# training views (see harness.tracking.ui for the links that keep them).
EXPERIMENT_KIND = "custom_model_development"


def experiment_id(client: MlflowClient, name: str, results: Path, tracking_uri: str) -> str:
    """The MLflow experiment named after the experiment file; artifacts under the results folder."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if is_local_store(tracking_uri):  # else the tracking server decides where artifacts go
        location = (results / "mlartifacts" / name).resolve().as_uri()
    try:  # the kind tag: a training experiment, not a GenAI one (for UIs that read it)
        return client.create_experiment(
            name, artifact_location=location, tags={Tag.EXPERIMENT_KIND: EXPERIMENT_KIND}
        )
    except mlflow.exceptions.MlflowException:  # another process created it first
        return client.get_experiment_by_name(name).experiment_id


def _params(flat: dict[str, Any]) -> list[Param]:
    return [Param(k, str(v)[:6000]) for k, v in sorted(flat.items())]


def log_params(client: MlflowClient, run_id: str, flat: dict[str, Any]) -> None:
    for _, batch, _ in _batches([], _params(flat), []):
        client.log_batch(run_id, params=batch)


def create_parent_run(
    client: MlflowClient,
    exp_id: str,
    study_name: str,
    settings: dict[str, Any],
    tags: dict[str, str] | None = None,
) -> str:
    run = client.create_run(
        exp_id, run_name=study_name, tags={Tag.STUDY: study_name, Tag.ROLE: "study", **(tags or {})}
    )
    log_params(client, run.info.run_id, settings)
    return run.info.run_id


def reopen_run(client: MlflowClient, run_id: str) -> None:
    client.update_run(run_id, status="RUNNING")


def end_run(client: MlflowClient, run_id: str, status: str = "FINISHED") -> None:
    client.set_terminated(run_id, status=status)


def create_run(
    client: MlflowClient,
    exp_id: str,
    run_name: str,
    tags: dict[str, str],
    flat: dict[str, Any],
    texts: dict[str, str] | None = None,
) -> str:
    """A new run with `tags` (a `mlflow.parentRunId` among them nests it), params `flat` (none:
    its EpochLogger writes them) and text artifacts `texts` ({artifact file: text}), written
    straight to the run's artifact location (no read of the run back to find it)."""
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    if flat:
        log_params(client, run.info.run_id, flat)
    if texts:
        # the artifact store, reached without the client: retried the same way
        envfaults.retrying(_write_texts, **_store(client.tracking_uri))(
            run.info.artifact_uri, texts
        )
    return run.info.run_id


def _write_texts(artifact_uri: str, texts: dict[str, str]) -> None:
    import posixpath
    import tempfile

    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(artifact_uri)
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in texts.items():
            path = Path(tmp) / posixpath.basename(name)
            path.write_text(text, encoding="utf-8")
            repo.log_artifact(str(path), posixpath.dirname(name) or None)


def redact(url: str) -> str:
    """A storage or tracking URL with any password replaced by ***."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


class EpochLogger:
    """Core callback: the epochs' metrics in batches, step = epoch, written at most every
    `flush_seconds` (counted from the logger's start, so a run shorter than that writes its
    curves once, with its end: `end_run`). The run's `params` go with its first write, and
    at the latest `flush_seconds` after the start (from a timer thread): a run of a second
    or two makes one write at its end, a long one shows its params and curves live.

    `synchronous=False` uses MLflow's async logging (a background queue) for the metrics:
    training goes on while the batch is written; `flush()` waits for every batch before the
    run ends. `seconds` is the time the training loop spent in here (the run's end is its
    caller's).
    """

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        synchronous: bool = True,
        flush_seconds: float = 0.0,
        params: dict[str, Any] | None = None,
    ):
        self.client, self.run_id, self.synchronous = client, run_id, synchronous
        self.flush_seconds = flush_seconds  # write at most this often; 0: every epoch
        self.pending, self.buffer, self.seconds = [], [], 0.0
        self.written_upto = 0  # the last epoch whose metrics were sent
        self.last_write = time.monotonic()
        self.lock = threading.Lock()  # the params' timer writes from its own thread
        self.params, self.timer = _params(params or {}), None
        if self.params and flush_seconds > 0:
            self.timer = threading.Timer(flush_seconds, self._write_params)
            self.timer.daemon = True
            self.timer.start()
        elif self.params:
            self._write_params()

    def _write_params(self) -> None:
        with self.lock:
            params, self.params = self.params, []
            try:  # one try: a store away is retried (and waited for) by the next write
                with envfaults.one_try():
                    for _, batch, _ in _batches([], params, []):
                        self.client.log_batch(self.run_id, params=batch)
            except (Exception, envfaults.EnvironmentStop):  # a timer thread: the run's end
                self.params = params  # writes them

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        started = time.perf_counter()
        now = int(time.time() * 1000)
        self.buffer += [Metric(k, float(v), now, epoch) for k, v in metrics.items()]
        if time.monotonic() - self.last_write >= self.flush_seconds:
            self._write(epoch)
        self.seconds += time.perf_counter() - started

    def _write(self, epoch: int) -> None:
        with self.lock:
            params, self.params = self.params, []
            for metrics, batch, _ in _batches(self.buffer, params, []):
                ops = self.client.log_batch(
                    self.run_id, metrics=metrics, params=batch, synchronous=self.synchronous
                )
                if ops is not None:
                    self.pending.append(ops)
            self.buffer = []
            self.written_upto, self.last_write = epoch, time.monotonic()

    def flush(self) -> None:
        """Send what is buffered and wait for every batch (the run is about to end)."""
        self.end_run(None)

    def end_run(
        self,
        status: str | None,
        tags: dict[str, str] | None = None,
        metrics: dict[str, float] | None = None,
    ) -> None:
        """The params and epochs not yet written, `tags` and `metrics` (step 0) in one write,
        then the run ends with `status` (None: the run goes on)."""
        if self.timer is not None:
            self.timer.cancel()
        with self.lock:
            for ops in self.pending:
                ops.wait()
            self.pending.clear()
            epochs, params, self.buffer, self.params = self.buffer, self.params, [], []
            if epochs:
                self.written_upto = max(m.step for m in epochs)
            _write_end(self.client, self.run_id, status, tags or {}, metrics, epochs, params)


def _batches(metrics: list, params: list, tags: list):
    """(metrics, params, tags) in batches within MLflow's limits: 1000 metrics, 100 params,
    100 tags, 1000 in all."""
    while metrics or params or tags:
        p, params = params[:100], params[100:]
        t, tags = tags[:100], tags[100:]
        n = 1000 - len(p) - len(t)
        m, metrics = metrics[:n], metrics[n:]
        yield m, p, t


def log_text(client: MlflowClient, run_id: str, text: str, artifact_file: str) -> None:
    client.log_text(run_id, text, artifact_file)


def running_trial_runs(client: MlflowClient, study_name: str) -> list[str]:
    """Ids of the study's trial runs that MLflow still shows RUNNING."""
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`{Tag.OPTUNA_STUDY}` = '{study_name}' "
        "and attributes.status = 'RUNNING'",
        max_results=10000,
    )
    return [r.info.run_id for r in runs if Tag.OPTUNA_TRIAL_NUMBER in r.data.tags]


def load_text(run_id: str, artifact_file: str) -> str:
    return mlflow.artifacts.load_text(f"runs:/{run_id}/{artifact_file}")


PREDICTIONS = "test_predictions.json"  # a tested model's class per test example, and the truth


def log_predictions(client: MlflowClient, run_id: str, pred: list[int], y: list[int]) -> None:
    """Store a model's predicted class for each test example, with the true classes."""
    client.log_text(run_id, json.dumps({"pred": pred, "y": y}), PREDICTIONS)


def load_predictions(run_id: str) -> tuple[list[int], list[int]] | None:
    """(predicted, true) classes of the test split stored with a run; None if it has none."""
    try:
        tree = json.loads(load_text(run_id, PREDICTIONS))
    except (mlflow.exceptions.MlflowException, OSError, ValueError):
        return None
    return tree["pred"], tree["y"]


def describe_run(client: MlflowClient, run_id: str, text: str) -> None:
    """The run's description in the UI (Markdown)."""
    client.set_tag(run_id, Tag.DESCRIPTION, text)


def log_metrics_once(client: MlflowClient, run_id: str, metrics: dict[str, float]) -> None:
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])


def finished_reruns(
    client: MlflowClient, exp_id: str, of_run: str, keys: tuple[str, ...]
) -> dict[int, dict]:
    """{seed: {key: value}} of the finished reruns of a trial run that logged every one of
    `keys` (as `best_KEY`, harness.config.metrics.best_name)."""
    runs = client.search_runs(
        [exp_id], filter_string=f"tags.`{Tag.RERUN_OF}` = '{of_run}'", max_results=1000
    )
    names = {k: best_name(k) for k in keys}
    return {
        int(r.data.params["seed"]): {k: r.data.metrics[n] for k, n in names.items()}
        for r in runs
        if r.info.status == "FINISHED" and all(n in r.data.metrics for n in names.values())
    }


def finished_ablations(
    client: MlflowClient, exp_id: str, of_run: str, metrics: tuple[str, ...]
) -> dict[tuple[str, int, str], dict[str, float]]:
    """{(variant, seed index, config key): {metric: value}} of the finished ablation runs of a
    trial run (tags `harness.ablation_of`, `harness.ablation`, `harness.seed_index`,
    `harness.ablation_config`) that logged every one of `metrics`."""
    runs = client.search_runs(
        [exp_id],
        filter_string=f"tags.`{Tag.ABLATION_OF}` = '{of_run}' and tags.`{Tag.ROLE}` = 'ablation'",
        max_results=10000,
    )
    return {
        (
            r.data.tags[Tag.ABLATION],
            int(r.data.tags[Tag.SEED_INDEX]),
            r.data.tags.get(Tag.ABLATION_CONFIG, ""),
        ): {m: r.data.metrics[m] for m in metrics}
        for r in runs
        if r.info.status == "FINISHED" and all(m in r.data.metrics for m in metrics)
    }


def run_record(client: MlflowClient, run_id: str) -> tuple[dict[str, str], dict[str, str]]:
    """(params, tags) of a run."""
    run = client.get_run(run_id)
    return dict(run.data.params), dict(run.data.tags)


def log_report(client: MlflowClient, run_id: str, files: list[Path]) -> None:
    for path in files:
        client.log_artifact(run_id, str(path), "report")


def yaml_text(tree: dict) -> str:
    import yaml

    buf = io.StringIO()
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml's, where PyYAML has it
    yaml.dump(tree, buf, Dumper=dumper, sort_keys=False)
    return buf.getvalue()


# --- Reproductions of trial runs (`run_study.py reproduce`). ---
def find_run(client: MlflowClient, run_id: str):
    """The run with this id, or None when the store has none (other errors are raised)."""
    try:
        return client.get_run(run_id)
    except mlflow.exceptions.MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def metric_steps(client: MlflowClient, run_id: str, keys: list[str]) -> dict[str, dict[int, float]]:
    """{metric: {step: value}} of those of `keys` the run has a history of; at a step logged
    twice, the later value."""
    out = {}
    for key in keys:
        history = sorted(
            client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp)
        )
        if history:
            out[key] = {m.step: m.value for m in history}
    return out


def end_run_tagged(
    client: MlflowClient,
    run_id: str,
    status: str,
    tags: dict[str, str],
    metrics: dict[str, float] | None = None,
) -> None:
    """Tag a run (and log `metrics` at step 0), then end it with `status` (FINISHED, FAILED or
    KILLED)."""
    _write_end(client, run_id, status, tags, metrics, [], [])


def end_if_running(client: MlflowClient, run_id: str, tags: dict[str, str]) -> bool:
    """End a run KILLED with `tags` if it is still RUNNING (a dead attempt's, found by its
    retry); whether it was."""
    if client.get_run(run_id).info.status != "RUNNING":
        return False
    end_run_tagged(client, run_id, "KILLED", tags)
    return True


def _write_end(client, run_id, status, tags, metrics, epochs: list, params: list) -> None:
    now = int(time.time() * 1000)
    ms = epochs + [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()]
    ts = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
    for m, p, t in _batches(ms, params, ts):
        client.log_batch(run_id, metrics=m, params=p, tags=t)
    if status is not None:
        client.set_terminated(run_id, status=status)
