"""End to end: the CLI runs a real study, and MLflow's and Optuna's own APIs read it back."""

from __future__ import annotations

import mlflow
import optuna
import pytest
import torch
from conftest import QUICKSTART, TINY, run_cli
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

STATUS = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED"}


def _tiny_args(results, n_trials: int) -> list[str]:
    args = [str(QUICKSTART), "--n-trials", str(n_trials), "--results", str(results), "--quiet"]
    for s in TINY:
        args += ["--set", s]
    return args


def _runs(results):
    uri = f"sqlite:///{results / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["quickstart"], output_format="list")
    return MlflowClient(uri), runs


def _study(results) -> optuna.Study:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = JournalStorage(JournalFileBackend(str(results / "optuna.journal")))
    return optuna.load_study(study_name="quickstart", storage=storage)


def _trial_runs(runs):
    return [r for r in runs if "optuna.trial_number" in r.data.tags]


def _ink(png) -> float:
    """The share of pixels that differ from the image's most common colour (its background)."""
    import numpy as np
    from matplotlib.image import imread

    pixels = imread(png)[..., :3].reshape(-1, 3)
    colours, counts = np.unique((pixels * 255).astype(np.uint8), axis=0, return_counts=True)
    return 1.0 - counts.max() / len(pixels)


def test_study_runs_resumes_and_extends(tmp_path, results_dir):
    work = tmp_path / "work"  # the process's cwd: nothing may be written here
    work.mkdir()
    first = run_cli(*_tiny_args(results_dir, 3), cwd=work)
    assert first.returncode == 0, first.stderr
    out = first.stdout
    assert "Best trials" in out and "Gain of the best trial" in out
    assert f"python run_study.py ui --results {results_dir}" in out
    assert list(work.iterdir()) == [], "the study wrote outside its results folder"
    assert sorted(p.name for p in results_dir.iterdir() if not p.name.startswith(".")) == [
        "checkpoints",
        "logs",
        "mlartifacts",
        "mlflow.db",
        "optuna.journal",
        "reports",
        "sources",
    ]  # all trials ended: no resume/ folder is left, empty or not
    assert (results_dir / "reports" / "quickstart" / "report.md").is_file()
    assert "Test split (best trial" in out

    study = _study(results_dir)
    trials = study.get_trials()
    assert len(trials) == 3
    assert [t.user_attrs.get("harness.baseline", False) for t in trials] == [True, False, False]
    assert trials[0].params == {}  # the baseline is the recipe, not a sample of the space

    client, runs = _runs(results_dir)
    parents = [r for r in runs if r.data.tags.get("harness.role") == "study"]
    assert len(parents) == 1 and parents[0].info.run_name == "quickstart"
    parent_id = parents[0].info.run_id
    assert study.user_attrs["mlflow_parent_run_id"] == parent_id
    assert study.metric_names == ["val_acc"]  # what Optuna Dashboard shows, not "Objective 0"
    summary = parents[0].data.metrics  # the study's summary on its parent run
    counts = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    assert summary["trials_complete"] == counts["COMPLETE"]
    assert summary["trials_pruned"] == counts["PRUNED"]
    assert summary["trials_failed"] == counts["FAIL"]
    best = max((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert summary["best_val_acc"] == best.value and summary["best_trial"] == best.number
    assert summary["baseline_val_acc"] == trials[0].value
    assert summary["gain_over_baseline"] == pytest.approx(best.value - trials[0].value)
    assert "best_test_acc" in summary
    assert "?workflowType=machine_learning" in out  # the hint lands on the runs table
    # Every plot of the report is readable: not blank; importances over the searched trials
    folder = results_dir / "reports" / "quickstart"
    pngs = sorted(folder.glob("*.png"))
    assert {"importances.png", "parallel.png", "gap_vs_acc.png"} <= {p.name for p in pngs}
    for png in pngs:
        assert _ink(png) > 0.03, f"{png.name} is (nearly) blank"
    md = (folder / "report.md").read_text()
    assert "## Which searched parameters mattered (fANOVA and PED-ANOVA)" in md
    assert any(f"- `{p}`:" in md for p in trials[1].params)  # names a searched parameter
    assert "Classical reference (the same split; settings chosen on val, refit on train" in out
    assert "logistic regression on pixels" in out and "RBF SVC on frozen features" in out
    # every claim is a paired comparison on the test examples, worded by its interval
    lines = out.splitlines()  # the pair on one line, its claim on the next
    claims = [
        f"{line} {lines[i + 1].strip()}"
        for i, line in enumerate(lines)
        if "against the classical reference (" in line
    ]
    assert len(claims) == 1 and "95 % CI [" in claims[0] and "McNemar p" in claims[0]
    words = (": beat (", ": did not beat (", ": no clear difference")
    assert sum(w in claims[0] for w in words) == 1
    assert "The best trial (trial" in out and "against the baseline (trial" in out
    # The registered best model is an MLflow model: raw uint8 images in, the recorded test_acc
    from mlflow import pytorch as mlflow_pytorch

    from harness.data import datasets as hdata
    from harness.tracking import runs as runs_mod

    mlflow.set_tracking_uri(f"sqlite:///{results_dir / 'mlflow.db'}")
    registered = mlflow_pytorch.load_model("models:/quickstart@best")
    config = runs_mod.load_config(best.user_attrs["mlflow_run_id"])
    task = hdata.load_target(config.data, config.split_seed)
    with torch.inference_mode():
        correct = (registered(task.x_test).argmax(1) == task.y_test).sum().item()
    acc = correct / len(task.y_test)
    # `best` is the best trial's model, or the study's soup when the soup's val_acc beats it
    version = mlflow.MlflowClient().get_model_version_by_alias("quickstart", "best")
    best_run = next(r for r in runs if r.info.run_id == version.run_id)
    assert acc == pytest.approx(best_run.data.metrics["test_acc"], abs=1e-9)
    if version.run_id != best.user_attrs["mlflow_run_id"]:
        assert best_run.data.tags["harness.role"] == "soup"
        assert best_run.data.metrics["val_acc"] > best.value
    children = _trial_runs(runs)
    assert len(children) == 3
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in children}
    for t in trials:
        run = by_number[t.number]
        assert run.info.run_id == t.user_attrs["mlflow_run_id"]
        assert run.info.run_name == f"trial-{t.number}"
        assert run.data.tags["mlflow.parentRunId"] == parent_id
        assert run.data.tags["optuna.study"] == "quickstart"
        assert run.data.tags["optuna.state"] == t.state.name
        assert run.info.status == STATUS[t.state.name]
        assert run.data.tags["harness.baseline"] == str(t.number == 0).lower()
        assert run.data.params["train.epochs"] == "2"
        for key, value in t.params.items():
            assert run.data.params[key] == str(value)
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert [m.step for m in history] == [1, 2]
        gap = client.get_metric_history(run.info.run_id, "overfit_gap")[-1].value
        train = client.get_metric_history(run.info.run_id, "train_acc")[-1].value
        assert gap == pytest.approx(train - history[-1].value)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "config.yaml" in artifacts
        if t.state.name == "COMPLETE":
            ckpt = client.list_artifacts(run.info.run_id, "checkpoints")
            assert [a.path for a in ckpt] == [f"checkpoints/trial-{t.number}-best.pt"]
            assert ckpt[0].file_size > 1000
            assert t.value == t.user_attrs["val_acc"] == max(m.value for m in history)
            # the runs table shows the value the study used, at the chosen epoch
            assert run.data.metrics["best_val_acc"] == t.value
            assert run.data.metrics["best_epoch"] == t.user_attrs["best_epoch"]
            assert "best_overfit_gap" in run.data.metrics
    # Sorting MLflow's runs by best_val_acc gives Optuna's ranking.
    exp = client.get_experiment_by_name("quickstart")
    ranked = client.search_runs(
        [exp.experiment_id],
        "tags.`optuna.state` = 'COMPLETE'",
        order_by=["metrics.best_val_acc DESC", "attributes.start_time ASC"],
    )
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    optuna_order = sorted(complete, key=lambda t: (-t.value, t.number))
    assert [r.info.run_id for r in ranked] == [t.user_attrs["mlflow_run_id"] for t in optuna_order]
    # The source model is registered, and every trial run names the version it started from.
    models = client.search_model_versions("name LIKE 'source-%'")
    assert len(models) == 1
    uri = f"models:/{models[0].name}/{models[0].version}"
    assert {r.data.tags["harness.source_model"] for r in children} == {uri}
    baseline_run = by_number[0]
    assert baseline_run.data.params["train.lr"] == "0.001"
    assert baseline_run.data.params["train.optimizer"] == "sgd"
    assert baseline_run.data.params["reg.weight_decay"] == "0.0"

    # The same command again: the study is done and says so; nothing new is run.
    again = run_cli(*_tiny_args(results_dir, 3), cwd=work)
    assert again.returncode == 0, again.stderr
    assert "is done: 3 finished trials, budget 3" in again.stdout
    assert len(_trial_runs(_runs(results_dir)[1])) == 3

    # A larger budget extends the same study, under the same parent run.
    more = run_cli(*_tiny_args(results_dir, 4), cwd=work)
    assert more.returncode == 0, more.stderr
    study = _study(results_dir)
    finished = [t for t in study.get_trials() if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 4
    runs = _runs(results_dir)[1]
    assert len(_trial_runs(runs)) == 4
    assert len([r for r in runs if r.data.tags.get("harness.role") == "study"]) == 1
    assert all(r.info.status != "RUNNING" for r in runs)
    assert list(work.iterdir()) == []

    # The report command: the same tested numbers, plus the top configs over 2 more seeds.
    rep = run_cli("report", "quickstart", "--results", str(results_dir), "--seeds", "2", cwd=work)
    assert rep.returncode == 0, rep.stderr
    assert "Over 2 more training seeds" in rep.stdout and "baseline:" in rep.stdout
    runs = _runs(results_dir)[1]
    reruns = [r for r in runs if r.data.tags.get("harness.role") == "seed_rerun"]
    complete = sorted(
        (t for t in _study(results_dir).get_trials() if t.state.name == "COMPLETE"),
        key=lambda t: (-t.value, t.number),
    )
    shown = {t.number for t in complete[:3]} | {0}  # the top 3 and the baseline
    assert len(reruns) == 2 * len(shown)
    assert all(r.info.status == "FINISHED" for r in reruns)
    assert len(_trial_runs(runs)) == 4  # reruns are not trial runs
    missing = run_cli("report", "nope", "--results", str(results_dir), cwd=work)
    assert missing.returncode == 2 and "no study 'nope'" in missing.stderr
    assert list(work.iterdir()) == []


def test_bad_input_creates_nothing(tmp_path):
    results = tmp_path / "results"
    proc = run_cli(str(QUICKSTART), "--results", str(results), "--set", "train.lr=-1", cwd=tmp_path)
    assert proc.returncode == 2
    assert "train.lr" in proc.stderr and "greater than 0" in proc.stderr
    assert str(QUICKSTART) in proc.stderr
    assert not results.exists()
    assert list(tmp_path.iterdir()) == []
