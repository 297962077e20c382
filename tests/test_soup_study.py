"""Model soups of a real (tiny) study, end to end: made when the study ends, incompatible trials
skipped with a line, candidates pruned after, logged and registered, reused by `report --soup`,
on a copied results folder without touching the original; the one tie rule; bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import optuna
import pytest
from conftest import QUICKSTART, TINY, run_cli

from harness import cli
from harness.config.load import load_spec
from harness.config.metrics import rank_key
from harness.config.spec import SpecError
from harness.config.tags import Tag
from harness.reports import report
from harness.study import retention
from harness.study.finish import soup_plan

# Two trials from scratch (other starting weights: never in a soup with the others), three from
# the source model; all enqueued, so the trials are known in advance.
SPACE = """\
search:
  n_trials: 6
  pruner: none
  top_k: 1
  soup: greedy
  space:
    train.lr: {categorical: [0.01, 0.03, 0.05]}
    model.pretrained: {categorical: [source, none]}
  enqueue:
    - {train.lr: 0.03, model.pretrained: none}
    - {train.lr: 0.05, model.pretrained: none}
    - {train.lr: 0.01, model.pretrained: source}
    - {train.lr: 0.03, model.pretrained: source}
    - {train.lr: 0.05, model.pretrained: source}
"""


def _experiment(folder: Path, name: str, space: str = SPACE) -> str:
    text = QUICKSTART.read_text().split("\nsearch:")[0].replace("name: quickstart", f"name: {name}")
    path = folder / f"{name}.yaml"
    path.write_text(text + "\n" + space)
    return str(path)


def _runs(results: Path, name: str):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{results / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=[name], output_format="list")


def _soups(results: Path, name: str) -> dict:
    runs = _runs(results, name)
    return {r.data.tags[Tag.SOUP]: r for r in runs if r.data.tags.get(Tag.ROLE) == "soup"}


@pytest.fixture(scope="module")
def study(tmp_path_factory, source_cache):
    folder = tmp_path_factory.mktemp("soup")
    results = folder / "results"
    shutil.copytree(source_cache, results / "sources")
    args = [_experiment(folder, "soup-test"), "--results", str(results), "--quiet"]
    for s in TINY:
        args += ["--set", s]
    assert cli.main(args) == 0
    return folder, results


def _study(results: Path, name: str = "soup-test") -> optuna.Study:
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(results / "optuna.journal"))
    )
    return optuna.load_study(study_name=name, storage=storage)


def test_the_study_ends_with_a_greedy_and_a_uniform_soup(study):
    _, results = study
    soups = _soups(results, "soup-test")
    assert set(soups) == {"uniform", "greedy"}
    uniform = soups["uniform"].data.tags[Tag.SOUP_INGREDIENTS].split(",")
    greedy = soups["greedy"].data.tags[Tag.SOUP_INGREDIENTS].split(",")
    ranked = [str(t.number) for t in retention.ranked_trials(_study(results))]
    assert uniform[0] == greedy[0] == next(n for n in ranked if n not in ("1", "2"))
    assert set(greedy) <= set(uniform) and len(uniform) == 4  # the baseline and 3 source trials
    assert not {"1", "2"} & set(uniform)  # the trials from scratch: other starting weights
    first = _study(results).trials[int(greedy[0])]
    assert soups["greedy"].data.metrics["val_acc"] >= first.values[0]  # never below its start
    for run in soups.values():
        assert run.data.tags[Tag.PARENT_RUN] and run.info.status == "FINISHED"
        assert {"val_acc", "val_loss", "test_acc", "test_loss"} <= set(run.data.metrics)
    text = (results / "reports" / "soup-test" / "report.md").read_text()
    assert "soup: skipped 2 complete trials: 2 with other starting weights" in text
    assert "Val and test side by side" in text and "greedy soup of" in text
    assert "(the study's soup)" in text and "95 % CI" in text


def test_the_soup_is_registered_and_best_moves_only_if_it_beats(study):
    from mlflow import MlflowClient

    _, results = study
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    greedy = _soups(results, "soup-test")["greedy"]
    soup_version = client.get_model_version_by_alias("soup-test", "soup")
    assert soup_version.run_id == greedy.info.run_id
    best_run = client.get_model_version_by_alias("soup-test", "best").run_id
    top = retention.ranked_trials(_study(results))[0]
    beats = greedy.data.metrics["val_acc"] > top.values[0]
    assert best_run == (greedy.info.run_id if beats else top.user_attrs["mlflow_run_id"])


def test_candidates_beyond_the_policy_lose_their_weights_after_the_soup(study):
    _, results = study
    st = _study(results)
    kept = {p.name for p in (results / "checkpoints" / "soup-test").glob("trial-*")}
    assert kept == {f"trial-{n}-best.pt" for n in retention.keep_set(st, "top_k", 1)}
    assert len(kept) == 2  # the best trial and the baseline


def test_rank_orders_the_runs_as_the_report_and_the_tie_rule_do(study):
    _, results = study
    st = _study(results)
    ranks = {
        r.data.tags.get(Tag.OPTUNA_TRIAL_NUMBER): r.data.metrics["rank"]
        for r in _runs(results, "soup-test")
        if "rank" in r.data.metrics
    }
    order = [str(t.number) for t in retention.ranked_trials(st)]
    assert sorted(ranks, key=ranks.get) == order
    assert report.best_trial(st).number == int(order[0])


def test_a_second_soup_reuses_the_first_and_a_copy_leaves_the_original_alone(study):
    """`report --soup` typed by a user (a new process) on a copy of the results folder."""
    folder, results = study
    copy = folder / "copy"
    shutil.copytree(results, copy)
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in results.rglob("*")}
    runs_before = {r.info.run_id for r in _runs(copy, "soup-test")}
    out = run_cli("report", "soup-test", "--results", str(copy), "--soup", cwd=folder)
    assert out.returncode == 0, out.stderr
    assert "greedy soup of" in out.stdout and "results folder moved from" in out.stderr + out.stdout
    soups = _soups(copy, "soup-test")
    assert set(soups) == {"uniform", "greedy"}  # no new soup runs: the first ones, reused
    new = {r.info.run_id for r in _runs(copy, "soup-test")} - runs_before
    assert not new
    after = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in results.rglob("*")}
    assert after == before  # nothing written into the original


def test_soup_with_fewer_than_two_candidates_says_so_and_changes_nothing(tmp_path, source_cache):
    results = tmp_path / "results"
    shutil.copytree(source_cache, results / "sources")
    space = SPACE.replace("top_k: 1\n", "keep_checkpoints: none\n").replace(
        "n_trials: 6", "n_trials: 2"
    )
    args = [_experiment(tmp_path, "nosoup", space), "--results", str(results), "--quiet"]
    for s in TINY:
        args += ["--set", s]
    assert cli.main(args) == 0
    assert cli.main(["report", "nosoup", "--results", str(results), "--soup"]) == 0
    assert not _soups(results, "nosoup")
    text = (results / "reports" / "nosoup" / "report.md").read_text()
    assert "soup: nothing to average: 0 compatible complete trials with kept weights" in text


def test_meta_learning_refuses_a_soup():
    meta = Path(QUICKSTART).parent / "digits_meta.yaml"
    with pytest.raises(SpecError, match="search.soup: a meta-learning study has no soup"):
        load_spec(meta, ["search.soup=greedy"])
    assert load_spec(meta).soup == "none"  # unset: no soup, no error
    assert load_spec(QUICKSTART).soup == "greedy"

    class MetaStudy:
        user_attrs = {Tag.TASK_KIND: "meta"}
        directions = [optuna.study.StudyDirection.MAXIMIZE]

    with pytest.raises(SpecError, match="--soup: a meta-learning study has no soup"):
        soup_plan(MetaStudy(), asked=True)


def test_one_tie_rule_everywhere():
    """Equal values: the lower val_loss first, then the earlier trial; the CLI table's order
    (Summary.complete), retention's, the progress line's best and rank_key agree."""
    study = optuna.create_study(direction="maximize")
    study.set_user_attr(Tag.OBJECTIVES, ["val_acc"])
    rows = [(0.9, 0.5), (0.93, 0.40), (0.93, 0.30), (0.93, 0.30), (0.8, 0.1)]
    for value, loss in rows:
        study.add_trial(
            optuna.trial.create_trial(
                value=value, user_attrs={"val_acc": value, "val_loss": loss, "mlflow_run_id": "x"}
            )
        )
    expected = [2, 3, 1, 0, 4]
    assert [t.number for t in retention.ranked_trials(study)] == expected
    assert report.best_trial(study).number == 2
    summary = report.Summary(
        "s",
        "maximize",
        [
            report.TrialRow(t.number, "COMPLETE", t.values[0], False, {}, dict(t.user_attrs))
            for t in study.trials
        ],
        None,
        objectives=("val_acc",),
    )
    assert [t.number for t in summary.complete()] == expected
    keys = [rank_key(v, {"val_loss": lo}, n, "val_acc", True) for n, (v, lo) in enumerate(rows)]
    assert sorted(range(5), key=keys.__getitem__) == expected
    assert retention.keep_set(study, "top_k", 1) == {2}


LOAD_WITHOUT_HARNESS = """
import json, sys
editable = [f for f in sys.meta_path if "__editable__" in str(getattr(f, "__module__", ""))]
sys.meta_path = [f for f in sys.meta_path if f not in editable]
sys.path_hooks = [h for h in sys.path_hooks if "__editable__" not in str(h)]
sys.path_importer_cache.clear()
sys.path = [p for p in sys.path if p not in ("", {repo!r})]
try:
    import harness
    raise SystemExit("the harness is importable: the test proves nothing")
except ImportError:
    pass
import mlflow, torch
mlflow.set_tracking_uri({uri!r})
model = mlflow.pytorch.load_model("models:/soup-test@best")
model.eval()
x = torch.load({data!r})
with torch.inference_mode():
    pred = model(x["x"]).argmax(1)
model.train()  # a module that can be fine-tuned further
import harness  # noqa: F811 (the copy logged with the model, not the repository's)
pyfunc = mlflow.pyfunc.load_model("models:/soup-test@best")
out = pyfunc.predict(x["x"][:4].numpy())
print(json.dumps({{"acc": (pred == x["y"]).sum().item() / len(pred), "classes": model.classes,
                  "harness": harness.__file__, "pyfunc_rows": len(out)}}))
"""


def test_the_registered_model_is_a_module_that_loads_without_the_harness(study, tmp_path):
    import json
    import subprocess
    import sys

    import torch
    from mlflow import MlflowClient

    from harness.data import datasets as hdata
    from harness.tracking.runs import load_config

    _, results = study
    uri = f"sqlite:///{results / 'mlflow.db'}"
    client = MlflowClient(uri)
    version = client.get_model_version_by_alias("soup-test", "best")
    import mlflow

    mlflow.set_tracking_uri(uri)
    config = load_config(version.run_id)
    task = hdata.load_target(config.data, config.split_seed)
    torch.save({"x": task.x_test, "y": task.y_test}, tmp_path / "test.pt")
    script = LOAD_WITHOUT_HARNESS.format(
        repo=str(Path(__file__).resolve().parents[1]), uri=uri, data=str(tmp_path / "test.pt")
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    recorded = client.get_run(version.run_id).data.metrics["test_acc"]
    assert got["acc"] == pytest.approx(recorded, abs=1e-9)
    assert got["classes"] == ["5", "6", "7", "8", "9"]  # the quickstart's target classes
    assert "/artifacts/" in got["harness"] or "/code/" in got["harness"]
    assert not got["harness"].startswith(str(Path(__file__).resolve().parents[1] / "harness"))
    assert got["pyfunc_rows"] == 4
    assert "soup-test" in version.description and "mlflow.pytorch.load_model" in version.description


def test_logging_the_model_leaves_the_trial_runs_duration_alone(study):
    from mlflow import MlflowClient

    _, results = study
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    top = retention.ranked_trials(_study(results))[0]
    run = client.get_run(top.user_attrs["mlflow_run_id"])
    version = next(
        v for v in client.search_model_versions("name = 'soup-test'") if v.run_id == run.info.run_id
    )
    assert run.info.end_time < version.creation_timestamp  # the model came after the trial
    took = (top.datetime_complete - top.datetime_start).total_seconds()
    assert (run.info.end_time - run.info.start_time) / 1000 < took + 5


def test_registering_never_shows_the_ended_run_as_running(tmp_path, monkeypatch):
    """Two processes of one study that end together both reach the registration: the one that
    reads the best trial's run while the other registers its model must read it ended (a
    reopen-and-restore once left that run RUNNING for good)."""
    import threading

    import mlflow
    import numpy as np
    import torch
    from mlflow import MlflowClient

    from harness.tracking import registry

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", uri)
    client = MlflowClient(uri)
    client.search_experiments()  # the store and its Default experiment (artifacts: ./mlruns)
    exp_id = client.create_experiment("reg", artifact_location=(tmp_path / "art").as_uri())
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    run_id = client.create_run(exp_id).info.run_id
    client.set_terminated(run_id, "FINISHED")
    before = client.get_run(run_id).info
    seen, done = set(), threading.Event()

    def watch():
        while not done.is_set():
            seen.add(client.get_run(run_id).info.status)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
        example = np.zeros((2, 1, 8, 8), dtype=np.float32)
        uri = registry.register_model(client, "reg", run_id, model, example, {})
    finally:
        done.set()
        watcher.join()
    after = client.get_run(run_id).info
    assert seen == {"FINISHED"}
    assert (after.status, after.end_time) == ("FINISHED", before.end_time)
    assert uri == "models:/reg/1"
    version = client.get_model_version("reg", "1")
    assert version.run_id == run_id
    (logged,) = client.search_logged_models(experiment_ids=["0", exp_id])  # not in Default
    assert (logged.experiment_id, logged.source_run_id) == (exp_id, run_id)
    assert logged.status.to_proto() == logged.status.READY.to_proto()
    assert list(work.iterdir()) == []  # nothing under the working folder (./mlruns)
