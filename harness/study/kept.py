"""The kept models of a study's trials: a complete trial's best weights found (the results
folder's file, else the run's logged copy) and loaded into its model, and the test predictions
stored with a run, so that two models tested on the same examples can be compared pairwise."""

from __future__ import annotations

from pathlib import Path

from harness.core import checkpoints, tasks
from harness.data import datacache
from harness.tracking import registry
from harness.tracking.runs import load_config


def weights_file(client, results: Path, name: str, number: int, run_id: str) -> Path | None:
    """A complete trial's best-weights file: the results folder's, else the run's logged copy
    downloaded; None when neither is kept."""
    path = checkpoints.best_weights_path(results, name, number)
    if path.is_file():
        return path
    return registry.download_checkpoint(client, run_id, results / "downloads" / run_id)


def trained_model(client, results: Path, name: str, number: int, run_id: str):
    """(config, data, model with the trial's best weights) of a complete trial; None when its
    weights are not kept."""
    path = weights_file(client, results, name, number, run_id)
    if path is None:
        return None
    config = load_config(run_id)
    data = tasks.load_data(config, datacache.under(results))
    model = tasks.build(config, data, None, load_weights=False)  # the checkpoint comes next
    model.load_state_dict(checkpoints.load_weights(path))
    model.eval()
    return config, data, model
