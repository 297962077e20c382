"""Weights in MLflow: a trial's best-weights file as a run artifact (logged, fetched,
deleted), the cached source models and the studies' best models as registered model versions,
and model URIs (models:/NAME@ALIAS) resolved to a local file."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric

from harness.config.tags import Tag
from harness.core import checkpoints
from harness.core.checkpoints import ARTIFACT_DIR, SOURCE_ARTIFACT_DIR
from harness.tracking.store import connect, log_params, redact
from harness.tracking.ui import run_link


def log_checkpoint(client: MlflowClient, run_id: str, path: Path) -> None:
    """Log a trial's best-weights file under `ARTIFACT_DIR` (checkpoints/) and tag the run so."""
    client.log_artifact(run_id, str(path), ARTIFACT_DIR)
    client.set_tag(run_id, Tag.CHECKPOINT, "logged")


def delete_checkpoint(client: MlflowClient, run_id: str) -> str:
    """Delete a run's `checkpoints/` artifacts through its artifact repository.

    MLflow's client has no call to delete one artifact; the repository (local files, the
    tracking server's proxied store, S3, ...) has one where the store supports deletion.
    Returns the run's new `harness.checkpoint` tag: deleted, or kept (when it cannot delete).
    """
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(client.get_run(run_id).info.artifact_uri)
    try:
        repo.delete_artifacts(ARTIFACT_DIR)
        state = "deleted"
    except (NotImplementedError, mlflow.exceptions.MlflowException, OSError):
        state = "kept (the artifact store cannot delete)"
    client.set_tag(run_id, Tag.CHECKPOINT, state)
    return state


def checkpoint_state(client: MlflowClient, run_id: str) -> str | None:
    return client.get_run(run_id).data.tags.get(Tag.CHECKPOINT)


def fetch_source_model(client: MlflowClient, key: str, dest: Path) -> tuple[Path, dict] | None:
    """The registry's latest `source-KEY` version as a local file and its source metrics, or
    None when this tracking store has none."""
    try:
        versions = client.search_model_versions(f"name = 'source-{key}'")
    except mlflow.exceptions.MlflowException:
        return None
    if not versions:
        return None
    v = max(versions, key=lambda v: int(v.version))
    path = resolve_model_uri(f"models:/source-{key}/{v.version}", dest)
    run = client.get_run(v.run_id)
    metrics = {
        k.removeprefix("source_"): val
        for k, val in run.data.metrics.items()
        if k.startswith("source_")
    }
    return path, metrics


def register_source_model(
    client: MlflowClient, exp_id: str, key: str, path: Path, settings: dict, metrics: dict
) -> str:
    """Register the pretrained source model (a state_dict) as `source-KEY`; return its models:/ URI.

    Done once per tracking store: a later call finds the registered version and returns it.
    """
    name = f"source-{key}"
    versions = client.search_model_versions(f"name = '{name}'")
    if versions:
        return f"models:/{name}/{max(int(v.version) for v in versions)}"
    run = client.create_run(
        exp_id, run_name=f"source-pretrain-{key}", tags={Tag.ROLE: "source_pretrain"}
    )
    run_id = run.info.run_id
    log_params(client, run_id, {f"source.{k}": v for k, v in settings.items()})
    client.log_batch(
        run_id, metrics=[Metric(f"source_{k}", float(v), 0, 0) for k, v in metrics.items()]
    )
    client.log_artifact(run_id, str(path), SOURCE_ARTIFACT_DIR)
    client.set_terminated(run_id, "FINISHED")
    with contextlib.suppress(mlflow.exceptions.MlflowException):  # another process was first
        client.create_registered_model(name, description="Pretrained source model (state_dict)")
    source = f"{client.get_run(run_id).info.artifact_uri}/{SOURCE_ARTIFACT_DIR}"
    version = client.create_model_version(name, source, run_id=run_id, tags={Tag.KEY: key})
    return f"models:/{name}/{version.version}"


def pin_model_uri(uri: str) -> str:
    """`models:/NAME@ALIAS` -> `models:/NAME/VERSION` (the version the alias names now), so
    that a run records the exact weights it started from; other URIs are returned as given."""
    match = re.fullmatch(r"models:/([^/@]+)@([\w-]+)", uri)
    if not match:
        return uri
    try:
        version = MlflowClient().get_model_version_by_alias(match[1], match[2]).version
    except mlflow.exceptions.MlflowException as err:
        raise ValueError(f"model.pretrained: cannot resolve {uri}: {err.message}") from None
    return f"models:/{match[1]}/{version}"


def check_model_uri(tracking_uri: str, uri: str) -> None:
    """ValueError unless `uri` (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/PATH)
    names something in the store at `tracking_uri`; downloads nothing."""
    client = connect(tracking_uri)
    try:
        if match := re.fullmatch(r"models:/([^/@]+)@([\w-]+)", uri):
            client.get_model_version_by_alias(match[1], match[2])
        elif match := re.fullmatch(r"models:/([^/@]+)/(\d+)", uri):
            client.get_model_version(match[1], match[2])
        elif match := re.fullmatch(r"models:/([^/@]+)", uri):
            if not client.search_model_versions(f"name = '{match[1]}'", max_results=1):
                raise ValueError(f"model.pretrained: {uri}: the model has no version")
        elif match := re.match(r"runs:/([0-9a-f]+)/", uri):
            client.get_run(match[1])
    except mlflow.exceptions.MlflowException as err:
        raise ValueError(
            f"model.pretrained: cannot resolve {uri} in {redact(tracking_uri)}: {err.message}"
        ) from None


def resolve_model_uri(uri: str, dest: Path) -> Path:
    """A `models:/NAME/VERSION` or `runs:/RUN_ID/PATH` URI -> a local state_dict file.

    The artifact is downloaded under `dest`; an MLflow PyTorch model gives its module's
    state_dict; any other folder must hold exactly one .pt/.pth file.
    """
    dest.mkdir(parents=True, exist_ok=True)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
    except mlflow.exceptions.MlflowException as err:
        raise ValueError(f"model.pretrained: cannot fetch {uri}: {err.message}") from None
    if local.is_file():
        return local
    if (local / "MLmodel").is_file():  # an MLflow PyTorch model (a study's registered best)
        from mlflow import pytorch as mlflow_pytorch

        state = local / checkpoints.STATE_DICT
        if not state.is_file():
            module = mlflow_pytorch.load_model(str(local), map_location="cpu")
            checkpoints.save_weights(module.state_dict(), state)
        return state
    return checkpoints.weights_file_in(local, f"model.pretrained: {uri}")


def download_checkpoint(client: MlflowClient, run_id: str, dest: Path) -> Path | None:
    """The run's logged best-weights file, downloaded under `dest`; None when it has none."""
    if checkpoint_state(client, run_id) != "logged":
        return None
    dest.mkdir(parents=True, exist_ok=True)
    folder = Path(client.download_artifacts(run_id, ARTIFACT_DIR, str(dest)))
    return checkpoints.first_weights_file(folder)


def registered_name(client: MlflowClient, name: str) -> str | None:
    """`name` where a registered model of that name has a version, else None."""
    with contextlib.suppress(mlflow.exceptions.MlflowException):
        if client.search_model_versions(f"name = '{name}'", max_results=1):
            return name
    return None


def alias_run(client: MlflowClient, name: str, run_id: str, aliases: tuple[str, ...]) -> bool:
    """Point `aliases` at the registered version of `name` logged from run `run_id`; whether
    there was one."""
    for v in client.search_model_versions(f"name = '{name}'"):
        if v.run_id == run_id and v.tags.get(Tag.FORMAT) == "mlflow-pytorch":
            for alias in aliases:
                client.set_registered_model_alias(name, alias, v.version)
            return True
    return False


def register_model(
    client: MlflowClient,
    name: str,
    run_id: str,
    model,
    example,
    metrics: dict[str, float],
    aliases: tuple[str, ...] = ("best",),
    classes: tuple | None = None,
    what: str = "",
) -> str:
    """Log `model` (a torch module: raw uint8 images (N, C, H, W) in, logits out) in run
    `run_id` as an MLflow PyTorch model with a signature and `example` as its input example,
    register it as a version of `name` (once per run) and point `aliases` at it (a study's
    soup: `soup`, and `best` too when it beats the best trial):
    `mlflow.pytorch.load_model("models:/NAME@best")` returns the model, and
    `model.pretrained: models:/NAME@best` in another study starts from its weights.

    The module is pickled whole (not a `torch.export` graph), so `.eval()`, `.train()` and
    further fine-tuning work; the harness's own code goes with it (`code_paths`), so it loads
    where the harness is not installed. `classes` (the output index's class, in order) is the
    module's `classes` attribute and the model's metadata. `what` (e.g. "trial 12 of study
    quickstart") starts the version's description. The finished run is logged into by its id,
    not reopened: its status and end time (the UI's Duration) stay the trial's own."""
    import torch
    import torchvision
    from mlflow import pytorch as mlflow_pytorch
    from mlflow.models import infer_signature

    if alias_run(client, name, run_id, aliases):  # registered before: once per run
        return f"models:/{name}@{aliases[0]}"
    with contextlib.suppress(mlflow.exceptions.MlflowException):  # exists already
        client.create_registered_model(name, description="Best model of the Optuna study")
    model.eval()
    if classes is not None:
        model.classes = [str(c) for c in classes]
    with torch.inference_mode():
        logits = model(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, logits)
    requirements = [f"{m.__name__}=={m.__version__.split('+')[0]}" for m in (torch, torchvision)]
    run = client.get_run(run_id)
    exp_id = run.info.experiment_id
    metadata = {"classes": getattr(model, "classes", None), "source_run": run_id}
    # logged into the ended run by its id, never reopened: its status and end time stay (a
    # reopen-and-restore let a concurrent reader take the reopened RUNNING for the true state).
    # The logged model is made in the run's experiment: without an active run MLflow would put
    # it in the Default experiment (and its artifacts under ./mlruns, or be refused by a login)
    logged = mlflow.initialize_logged_model(
        name="model", source_run_id=run_id, params=run.data.params, experiment_id=exp_id
    )
    info = mlflow_pytorch.log_model(
        model,
        name="model",
        signature=signature,
        input_example=example,
        pip_requirements=requirements,
        serialization_format="pickle",
        code_paths=[str(Path(__file__).resolve().parents[1])],
        metadata=metadata,
        run_id=run_id,
        model_id=logged.model_id,
    )
    tags = {k: f"{v:.6g}" for k, v in metrics.items()} | {Tag.FORMAT: "mlflow-pytorch"}
    figures = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if "acc" in k)
    description = (
        f"[{what or 'run ' + run_id}]({run_link(exp_id, run_id)}): {figures}. "
        "Raw uint8 images (N, C, H, W) in, logits out; "
        f"output i is class {metadata['classes']}[i]. Load it with "
        f"mlflow.pytorch.load_model('models:/{name}/{{version}}') (a torch.nn.Module: .eval(), "
        "fine-tune it further) or mlflow.pyfunc.load_model; the harness need not be installed."
    )
    version = client.create_model_version(
        name,
        info.model_uri,
        run_id=run_id,
        tags=tags,
        model_id=info.model_id,
    )
    client.update_model_version(  # the description names the version it belongs to
        name, version.version, description=description.replace("{version}", str(version.version))
    )
    for alias in aliases:
        client.set_registered_model_alias(name, alias, version.version)
    return f"models:/{name}/{version.version}"
