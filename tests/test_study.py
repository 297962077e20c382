"""The study in-process: sampling, budgets, and true states of pruned and failed trials."""

from __future__ import annotations

import mlflow
import optuna
import pytest
from conftest import QUICKSTART, TINY
from mlflow import MlflowClient

import harness.study.search as study_mod
from harness.config.load import load_spec
from harness.config.spec import SpecError
from harness.core import tasks
from harness.study import space
from harness.study.search import StudyOptions, open_storage, run_study
from harness.study.space import suggest


def _spec(*overrides: str):
    return load_spec(QUICKSTART, [*TINY, *overrides])


def _client(results):
    uri = f"sqlite:///{results / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def _trial_runs(client, name="quickstart"):
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return {
        int(r.data.tags["optuna.trial_number"]): r
        for r in runs
        if "optuna.trial_number" in r.data.tags
    }


def test_pruned_and_failed_trials_are_recorded_truthfully(results_dir, monkeypatch):
    spec = _spec("train.epochs=3")
    # Every trial but the baseline is pruned at epoch 2; the third call of fit fails.
    monkeypatch.setattr(
        study_mod,
        "make_pruner",
        lambda s: optuna.pruners.ThresholdPruner(lower=1.5, n_warmup_steps=2),
    )
    calls = []
    real_fit = tasks.fit

    def flaky_fit(config, model, data, callbacks, resume=None):
        calls.append(config)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        return real_fit(config, model, data, callbacks, resume=resume)

    monkeypatch.setattr(tasks, "fit", flaky_fit)
    summary = run_study(spec, StudyOptions(results=results_dir, n_trials=3, quiet=True))

    states = [t.state for t in summary.trials]
    assert states == ["COMPLETE", "PRUNED", "FAIL", "PRUNED"]  # a failure does not use the budget
    client = _client(results_dir)
    runs = _trial_runs(client)
    assert sorted(runs) == [0, 1, 2, 3]

    base = runs[0]
    assert base.info.status == "FINISHED" and base.data.tags["optuna.state"] == "COMPLETE"
    assert base.data.tags["harness.baseline"] == "true"
    assert len(client.get_metric_history(base.info.run_id, "val_acc")) == 3

    for n in (1, 3):
        pruned = runs[n]
        # a pruner's decision is a finished trial, not a fault: FINISHED, and it says so
        assert pruned.info.status == "FINISHED"
        assert pruned.data.tags["optuna.state"] == "PRUNED"
        assert pruned.data.tags["harness.pruned_epoch"] == "2"
        assert pruned.data.tags["mlflow.note.content"].startswith("Pruned at epoch 2 by Optuna")
        assert "best_val_acc" not in pruned.data.metrics  # no value: it sorts after the ranked
        history = client.get_metric_history(pruned.info.run_id, "val_acc")
        assert [m.step for m in history] == [1, 2]  # the curve up to the pruning epoch
        assert client.list_artifacts(pruned.info.run_id, "checkpoints") == []

    failed = runs[2]
    assert failed.info.status == "FAILED"
    assert failed.data.tags["optuna.state"] == "FAIL"
    assert "injected failure" in failed.data.tags["harness.error"]
    artifacts = {a.path for a in client.list_artifacts(failed.info.run_id)}
    assert "traceback.txt" in artifacts
    text = mlflow.artifacts.load_text(f"runs:/{failed.info.run_id}/traceback.txt")
    assert "RuntimeError: injected failure" in text

    parent = client.get_run(base.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED"
    for run in runs.values():
        assert run.data.tags["harness.threads"].isdigit()
        assert run.data.tags["harness.device"] == "cpu"
        assert run.data.tags["harness.version.torch"]


def test_a_study_whose_trials_all_fail_stops(results_dir, monkeypatch):
    def broken_fit(*args, **kwargs):
        raise RuntimeError("always broken")

    monkeypatch.setattr(tasks, "fit", broken_fit)
    summary = run_study(_spec(), StudyOptions(results=results_dir, n_trials=2, quiet=True))
    assert [t.state for t in summary.trials] == ["FAIL", "FAIL"]
    client = _client(results_dir)
    parents = client.search_runs(
        [client.get_experiment_by_name("quickstart").experiment_id],
        filter_string="tags.`harness.role` = 'study'",
    )
    assert [p.info.status for p in parents] == ["FAILED"]


def test_same_study_name_with_another_spec_is_refused(results_dir):
    run_study(_spec(), StudyOptions(results=results_dir, n_trials=1, quiet=True))
    with pytest.raises(SpecError, match="different experiment spec"):
        run_study(_spec("train.momentum=0.5"), StudyOptions(results=results_dir, n_trials=2))
    # A new name is a new study in the same stores.
    other = run_study(
        _spec("train.momentum=0.5"),
        StudyOptions(results=results_dir, n_trials=1, study_name="other", quiet=True),
    )
    assert [t.state for t in other.trials] == ["COMPLETE"]


def _conditional_spec(tmp_path, *overrides):
    path = tmp_path / "cond.yaml"
    path.write_text(
        """
name: cond
search:
  space:
    strategy.kind: {categorical: [full, linear_probe]}
    reg.dropout: {float: [0.0, 0.5], when: {strategy.kind: full}}
    train.lr: {float: [1.0e-4, 1.0e-1], log: true}
"""
    )
    return load_spec(path, list(overrides))


def test_conditional_parameters_follow_their_condition(tmp_path):
    spec = _conditional_spec(tmp_path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(20):
        trial = study.ask()
        values = suggest(trial, spec)
        seen.add(values["strategy.kind"])
        assert ("reg.dropout" in values) == (values["strategy.kind"] == "full")
        assert 1e-4 <= values["train.lr"] <= 1e-1
        study.tell(trial, 0.0)
    assert seen == {"full", "linear_probe"}


def test_pinned_key_leaves_the_space_and_conditions_follow_it(tmp_path):
    pinned_probe = _conditional_spec(tmp_path, "strategy.kind=linear_probe")
    pinned_full = _conditional_spec(tmp_path, "strategy.kind=full")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for spec, has_dropout in ((pinned_probe, False), (pinned_full, True)):
        assert "strategy.kind" not in spec.search.space
        trial = study.ask()
        values = suggest(trial, spec)
        assert "strategy.kind" not in values
        assert ("reg.dropout" in values) is has_dropout
        study.tell(trial, 0.0)


def test_storage_urls(tmp_path):
    from optuna.storages import RDBStorage
    from optuna.storages.journal import JournalStorage

    assert isinstance(open_storage(str(tmp_path / "s.journal")), JournalStorage)
    assert isinstance(open_storage(f"sqlite:///{tmp_path / 's.db'}"), RDBStorage)
    with pytest.raises(SpecError, match="--storage"):
        open_storage(str(tmp_path / "s.txt"))


@pytest.mark.parametrize("sampler", ["tpe", "random", "cmaes", "gp"])
def test_every_sampler_samples_the_conditional_space(tmp_path, sampler):
    spec = _conditional_spec(tmp_path, f"search.sampler={sampler}")
    study = optuna.create_study(sampler=space.make_sampler(spec), direction="maximize")
    for i in range(7):  # past the samplers' startup trials
        trial = study.ask()
        values = suggest(trial, spec)
        assert ("reg.dropout" in values) == (values["strategy.kind"] == "full")
        study.tell(trial, float(i % 3))
    assert len(study.trials) == 7


def test_pruners_follow_the_file(tmp_path):
    assert isinstance(space.make_pruner(_spec()), optuna.pruners.MedianPruner)
    hyperband = space.make_pruner(_spec("search.pruner=hyperband"))
    assert isinstance(hyperband, optuna.pruners.HyperbandPruner)
    assert isinstance(space.make_pruner(_spec("search.pruner=none")), optuna.pruners.NopPruner)


def test_timeout_stops_starting_trials(results_dir):
    summary = run_study(
        _spec("train.epochs=1"),
        StudyOptions(results=results_dir, n_trials=500, timeout=2.0, quiet=True),
    )
    finished = [t for t in summary.trials if t.state in ("COMPLETE", "PRUNED")]
    assert 1 <= len(finished) < 500


def test_rdb_storage_pings_and_recycles_its_connections(tmp_path):
    """A connection dropped while a long trial trained is replaced before it is used."""
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    pool = storage.engine.pool
    assert pool._pre_ping is True and pool._recycle == 240


def test_rdb_storage_url(results_dir):
    url = f"sqlite:///{results_dir / 'optuna.db'}"
    opts = StudyOptions(results=results_dir, storage=url, n_trials=2, quiet=True)
    summary = run_study(_spec(), opts)
    assert [t.state for t in summary.trials] == ["COMPLETE", "COMPLETE"]
    study = optuna.load_study(study_name="quickstart", storage=url)
    assert study.user_attrs["mlflow_parent_run_id"]
    assert not (results_dir / "optuna.journal").exists()


def _artifact_files(results, pattern="*.pt"):
    return sorted(p for p in (results / "mlartifacts").rglob(pattern) if "checkpoints" in p.parts)


def test_checkpoint_retention_keeps_top_k_and_frees_the_bytes(results_dir):
    spec = _spec("search.top_k=1", "search.pruner=none")
    summary = run_study(spec, StudyOptions(results=results_dir, n_trials=5, quiet=True))
    complete = summary.complete()
    assert len(complete) == 5
    kept = {complete[0].number, 0}  # the best, and the baseline (needed for the report)
    local = sorted((results_dir / "checkpoints" / "quickstart").glob("*.pt"))
    assert [p.name for p in local] == [f"trial-{n}-best.pt" for n in sorted(kept)]
    client = _client(results_dir)
    runs = _trial_runs(client)
    for number, run in runs.items():
        logged = client.list_artifacts(run.info.run_id, "checkpoints")
        if number in kept:
            assert run.data.tags["harness.checkpoint"] == "logged" and len(logged) == 1
        else:
            assert run.data.tags["harness.checkpoint"] == "deleted" and logged == []
    # The bytes really went: only the kept trials' files remain in the artifact store.
    on_disk = _artifact_files(results_dir)
    assert len(on_disk) == len(kept)
    assert {p.parent.parent.parent.name for p in on_disk} == {runs[n].info.run_id for n in kept}


def test_report_tests_once_registers_best_and_writes_plots(results_dir):
    spec = _spec("train.epochs=3")
    opts = StudyOptions(results=results_dir, n_trials=3, quiet=True)
    summary = run_study(spec, opts)
    best = summary.complete()[0]
    assert set(summary.test) == {best.number, 0}
    client = _client(results_dir)
    runs = _trial_runs(client)
    for number in summary.test:
        history = client.get_metric_history(runs[number].info.run_id, "test_acc")
        assert len(history) == 1 and 0.0 <= history[0].value <= 1.0
    untested = set(runs) - set(summary.test)
    assert all("test_acc" not in runs[n].data.metrics for n in untested)
    # The best trial's version, and the study's soup (search.soup greedy) as a second version.
    versions = {v.run_id: v for v in client.search_model_versions("name = 'quickstart'")}
    version = versions.pop(best.attrs["mlflow_run_id"])
    assert version.tags["test_acc"] == f"{summary.test[best.number]['test_acc']:.6g}"
    (soup_run,) = versions
    assert client.get_run(soup_run).data.tags["harness.role"] == "soup"
    folder = results_dir / "reports" / "quickstart"
    names = {p.name for p in summary.files}
    assert {"report.md", "history.png", "curves.png", "gap_vs_acc.png"} <= names
    assert all((folder / n).stat().st_size > 1000 for n in names if n.endswith(".png"))
    text = (folder / "report.md").read_text()
    assert "Gain of the best trial" in text and "![" in text
    parent = runs[0].data.tags["mlflow.parentRunId"]
    logged = {a.path for a in client.list_artifacts(parent, "report")}
    assert "report/report.md" in logged and "report/curves.png" in logged
    # Running the report again (a finished study) tests nothing twice and registers no copy.
    again = run_study(spec, opts)
    assert again.test == summary.test
    for number in summary.test:
        assert len(client.get_metric_history(runs[number].info.run_id, "test_acc")) == 1
    assert len(client.search_model_versions("name = 'quickstart'")) == 2


def test_pretrained_from_an_mlflow_uri_or_a_file(results_dir):
    run_study(_spec(), StudyOptions(results=results_dir, n_trials=1, quiet=True))
    client = _client(results_dir)
    version = client.search_model_versions("name LIKE 'source-%'")[0]
    uri = f"models:/{version.name}/{version.version}"
    source_file = next((results_dir / "sources").glob("*.pt"))
    for name, pretrained in (("from-uri", uri), ("from-file", str(source_file))):
        spec = _spec(f"model.pretrained={pretrained}")
        opts = StudyOptions(results=results_dir, n_trials=1, study_name=name, quiet=True)
        summary = run_study(spec, opts)
        assert [t.state for t in summary.trials] == ["COMPLETE"]
        run = client.get_run(summary.trials[0].attrs["mlflow_run_id"])
        assert run.data.tags["harness.pretrained"] in (uri, str(source_file.resolve()))
    # Both started from the same weights as the source-pretrained baseline: same curve.
    exp = client.get_experiment_by_name("quickstart")
    finals = {
        r.data.tags["optuna.study"]: r.data.metrics["val_acc"]
        for r in client.search_runs([exp.experiment_id], "tags.`optuna.trial_number` = '0'")
    }
    assert finals["from-uri"] == finals["from-file"] == finals["quickstart"]
    downloaded = list((results_dir / "pretrained").rglob("*.pt"))
    assert len(downloaded) == 1


def test_bad_mlflow_uri_is_an_input_error(results_dir):
    spec = _spec("model.pretrained=models:/no-such-model/1")
    with pytest.raises(SpecError, match="models:/no-such-model/1: there is no MLflow store at"):
        run_study(spec, StudyOptions(results=results_dir, n_trials=1, quiet=True))
    assert not (results_dir / "mlflow.db").exists()  # none was created to look
    mlflow.MlflowClient(f"sqlite:///{results_dir / 'mlflow.db'}").search_experiments()
    with pytest.raises(SpecError, match="cannot resolve models:/no-such-model/1 in sqlite"):
        run_study(spec, StudyOptions(results=results_dir, n_trials=1, quiet=True))


def test_multi_objective_study_reports_the_pareto_front(results_dir):
    spec = _spec(
        "objective.metrics=[val_acc, overfit_gap]",
        "objective.directions=[maximize, minimize]",
        "search.pruner=none",
        "search.sampler=nsga2",
    )
    summary = run_study(spec, StudyOptions(results=results_dir, n_trials=4, quiet=True))
    assert [t.state for t in summary.trials] == ["COMPLETE"] * 4
    study = optuna.load_study(
        study_name="quickstart", storage=open_storage(str(results_dir / "optuna.journal"))
    )
    assert len(study.directions) == 2
    for t in study.trials:
        assert t.values == [t.user_attrs["val_acc"], t.user_attrs["overfit_gap"]]
    assert summary.pareto == {t.number for t in study.best_trials} and summary.pareto
    assert (results_dir / "reports" / "quickstart" / "pareto.png").stat().st_size > 1000
    from harness.reports.report import render

    assert not (results_dir / "resume").exists()  # every trial ended: no empty folder is left
    text = render(summary)
    assert "Pareto front (val_acc, overfit_gap)" in text
    # it fits a 120-column terminal: but the UI's command and URL, each alone on its line
    wide = [line for line in text.splitlines() if len(line) > 120]
    assert all(line.startswith("  http") or " run_study.py ui " in line for line in wide), wide


def test_multi_objective_refuses_a_pruner():
    with pytest.raises(SpecError, match="cannot prune multi-objective"):
        _spec(
            "objective.metrics=[val_acc, overfit_gap]", "objective.directions=[maximize, minimize]"
        )


def test_names_that_reach_paths_are_sanitised(results_dir, tmp_path):
    opts = StudyOptions(results=results_dir, n_trials=1, study_name="../../evil/..name", quiet=True)
    run_study(_spec(), opts)
    inside = {p.resolve() for p in results_dir.rglob("*")}
    assert all(str(p).startswith(str(results_dir.resolve())) for p in inside)
    assert not (tmp_path / "evil").exists() and not (results_dir.parent / "evil").exists()
    from harness.study.search import safe_name

    assert ".." not in safe_name("../../evil/..name") and "/" not in safe_name("a/b")
    assert (results_dir / "reports" / safe_name("../../evil/..name")).is_dir()


def test_passwords_are_redacted():
    from harness.tracking import store as tracking

    for url in (
        "postgresql://harness:s3cret@127.0.0.1:1/optuna",
        "postgresql+psycopg://harness:s3cret@db.example:5432/optuna?sslmode=require",
        "http://user:s3cret@mlflow.local:5000",
    ):
        assert "s3cret" not in tracking.redact(url) and ":***@" in tracking.redact(url)
    assert tracking.redact("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


def test_a_node_without_the_source_model_fetches_it_from_the_registry(results_dir, tmp_path):
    run_study(_spec(), StudyOptions(results=results_dir, n_trials=1, quiet=True))
    (cached,) = (results_dir / "sources").glob("*.pt")
    # Another node: its own results folder, the same MLflow store, no source model cached.
    other = tmp_path / "node2"
    opts = StudyOptions(
        results=other,
        n_trials=1,
        study_name="node2",
        quiet=True,
        tracking_uri=f"sqlite:///{results_dir / 'mlflow.db'}",
    )
    import harness.core.source as source_mod

    def no_training(*args, **kwargs):
        raise AssertionError("the source model was trained again")

    original = source_mod.fit
    source_mod.fit = no_training
    try:
        run_study(_spec(), opts)
    finally:
        source_mod.fit = original
    (fetched,) = (other / "sources").glob("*.pt")
    assert fetched.read_bytes() == cached.read_bytes()


def test_trial_runs_carry_system_metrics_and_tracking_cost(results_dir):
    spec = _spec("search.system_metrics_interval=0.05", "train.epochs=6")
    run_study(spec, StudyOptions(results=results_dir, n_trials=1, quiet=True))
    client = _client(results_dir)
    run = client.get_run(_trial_runs(client)[0].info.run_id)
    system = [k for k in run.data.metrics if k.startswith("system/")]
    assert any("cpu_utilization" in k for k in system), sorted(run.data.metrics)
    assert run.data.metrics["tracking_ms"] > 0 and 0 < run.data.metrics["tracking_share"] < 1


def test_a_sampled_combination_the_config_refuses_fails_with_its_reason(results_dir, tmp_path):
    """Each key of the space is in range, but the values drawn together are not a valid config
    (SWA from epoch 3, inside LP-FT's 3-epoch linear probe): the trial fails with the reason,
    which the report prints; the study stops instead of drawing for ever."""
    import yaml

    raw = yaml.safe_load(QUICKSTART.read_text())
    raw["search"]["space"] = {
        "strategy.kind": {"categorical": ["lp_ft"]},
        "strategy.lp_epochs": {"categorical": [3]},
        "reg.swa_start": {"categorical": [0.5]},
    }
    path = tmp_path / "bad_combination.yaml"
    path.write_text(yaml.safe_dump(raw))
    spec = load_spec(path, [*TINY, "train.epochs=4"])
    summary = run_study(spec, StudyOptions(results=results_dir, n_trials=2, quiet=True))
    failed = [t for t in summary.trials if t.state == "FAIL"]
    assert failed and all("do not combine" in t.attrs["harness.error"] for t in failed)
    assert "within LP-FT's linear probe" in failed[0].attrs["harness.error"]
