"""`report STUDY --compare OTHER...`: several studies in one report, paired on test only where
their test splits are the same, logged to its own MLflow experiment, the studies untouched."""

from __future__ import annotations

import shutil

import mlflow
import numpy as np
import optuna
import pytest
from conftest import run_cli, tree_state
from optuna.storages.journal import JournalFileBackend, JournalStorage

from harness import cli
from harness.config.tags import Tag
from harness.reports import compare


def _record(label: str, data_hash: str, correct, y=(0, 1, 2, 3) * 25, **kw):
    fields = {
        "label": label,
        "kind": "finetune",
        "objective": "val_acc",
        "test_metric": "test_acc",
        "rows": [("best trial (trial 3)", 0.9, 0.88)],
        "finished": 3,
        "complete": 3,
        "seconds": 75.0,
        "history": [0.5, None, 0.9],
        "curve": [0.4, 0.9],
        "best": "trial 3",
        "data_hash": data_hash,
        "correct": None if correct is None else np.asarray(correct, bool),
        "y": tuple(y),
    }
    return compare.StudyRecord(**(fields | kw))


def test_paired_interval_only_when_the_test_splits_are_equal():
    rng = np.random.default_rng(0)
    a = _record("a", "h1", rng.random(100) < 0.9)
    b = _record("b", "h1", rng.random(100) < 0.6)
    other = _record("c", "h2", rng.random(100) < 0.6)
    claims, unpaired = compare.paired([a, b, other])
    assert [(c.a, c.b) for c in claims] == [
        ("a's best trial (trial 3)", "b's best trial (trial 3)")
    ]
    assert claims[0].comparison.low < claims[0].comparison.diff < claims[0].comparison.high
    assert unpaired == [
        "a against c: not paired, the test splits differ (data hash h1 vs h2); no interval.",
        "b against c: not paired, the test splits differ (data hash h1 vs h2); no interval.",
    ]
    text = "\n".join(compare.lines([a, b, other]))
    assert "95 % CI" in text and text.count("95 % CI") == 1
    assert set(compare.metrics([a, b, other])) == {
        "pair0_diff",
        "pair0_ci_low",
        "pair0_ci_high",
        "pair0_p",
    }
    meta = _record("m", "h1", None, objective="meta_val_acc", test_metric="meta_test_acc_1shot")
    claims, unpaired = compare.paired([a, meta])
    assert claims == [] and unpaired == [
        "a against m: not paired, no per-example test predictions for m; no interval."
    ]
    table = "\n".join(compare.table([a, meta]))  # each study's own headline metric, by name
    assert "val_acc 0.9000" in table and "meta_val_acc 0.9000" in table
    assert "meta_test_acc_1shot 0.8800" in table and "1m 15s" in table


def test_settings_that_differ():
    a = _record(
        "a", "h", None, fixed={"train.lr": "0.001", "seed": "0"}, space={"x": "float [0, 1]"}
    )
    b = _record(
        "b",
        "h",
        None,
        fixed={"train.lr": "0.01", "seed": "0"},
        space={"x": "float [0, 2]", "y": "int [1, 3]"},
    )
    assert compare.differences([a, b]) == [
        "  train.lr: a 0.001; b 0.01",
        "  searched x: a float [0, 1]; b float [0, 2]",
        "  searched y: a not searched; b int [1, 3]",
    ]


@pytest.mark.parametrize(
    ("others", "message"),
    [
        (["quickstart"], "--compare: give at least one other study than quickstart"),
        (["nosuch"], "no study 'nosuch' in"),
        (["qs-b@postgresql://nobody@127.0.0.1:1/none"], "cannot open the Optuna storage"),
        (["qs-b@{tmp}/elsewhere"], "no Optuna journal at"),
    ],
)
def test_bad_input_creates_nothing(tmp_path, capsys, others, message):
    results = tmp_path / "results"
    results.mkdir()
    storage = JournalStorage(JournalFileBackend(str(results / "optuna.journal")))
    optuna.create_study(study_name="quickstart", storage=storage)
    before = tree_state(tmp_path)
    others = [o.format(tmp=tmp_path) for o in others]
    code = cli.main(["report", "quickstart", "--results", str(results), "--compare", *others])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and message in err, err
    assert tree_state(tmp_path) == before


def test_unknown_results_folder_creates_nothing(tmp_path, capsys):
    results = tmp_path / "results"
    assert cli.main(["report", "a", "--results", str(results), "--compare", "b"]) == 2
    assert "no Optuna journal at" in capsys.readouterr().err
    assert not results.exists()


@pytest.mark.slow
def test_compare_on_a_copied_results_folder(tmp_path, tiny_studies):
    copy = tmp_path / "copied"
    shutil.copytree(tiny_studies, copy)
    before = tree_state(tiny_studies)
    client = mlflow.MlflowClient(f"sqlite:///{copy / 'mlflow.db'}")
    parents = {
        r.data.tags[Tag.STUDY]: r
        for r in client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
        if r.data.tags.get(Tag.ROLE) == "study"
    }
    args = ["report", "quickstart", "--results", str(copy), "--compare", "qs-b", "qs-other"]
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert tree_state(tiny_studies) == before  # the original folder: nothing written
    assert "quickstart's best trial" in out and "qs-b's best trial" in out
    assert out.count("95 % CI") == 1  # quickstart and qs-b share the split
    assert "quickstart against qs-other: not paired, the test splits differ" in out
    assert "qs-b against qs-other: not paired, the test splits differ" in out
    assert "data.split_seed: quickstart None; qs-b None; qs-other 1" in out
    assert "train.optimizer: quickstart searched; qs-b adamw; qs-other searched" in out
    folder = copy / "reports" / "compare-quickstart-qs-b-qs-other"
    assert {p.name for p in folder.iterdir()} == {"report.md", "history.png", "curves.png"}
    assert "quickstart against qs-other: not paired" in (folder / "report.md").read_text()

    exp = client.get_experiment_by_name("compare")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.tags[Tag.ROLE] == "compare" and run.info.status == "FINISHED"
    for name, parent in parents.items():
        assert run.data.tags[Tag.COMPARED + name] == parent.info.run_id
        again = client.get_run(parent.info.run_id)  # the studies' own records: untouched
        assert again.data.metrics == parent.data.metrics and again.data.tags == parent.data.tags
    assert {"pair0_diff", "pair0_ci_low", "pair0_ci_high", "pair0_p"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/report.md", "report/history.png", "report/curves.png"} <= artifacts
