"""Warm start (`--warm-start`, `search.warm_start`): what is handed over from earlier studies,
what is dropped, clipped and skipped, what is refused, and that the new study keeps its own
budget and records."""

from __future__ import annotations

import shutil

import optuna
import pytest
from conftest import QUICKSTART, REPO, run_cli, tiny_study_args, tree_state
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState, create_trial

from harness import cli
from harness.config.load import load_spec
from harness.config.tags import Tag
from harness.study import warm
from harness.study.space import make_sampler, suggest
from harness.tracking.runs import StudyOptions

LR = FloatDistribution(1e-4, 1e-1, log=True)
AUG = CategoricalDistribution(["none", "crop"])
BATCH = CategoricalDistribution([16, 32])


def _narrow(tmp_path):
    """The quickstart space with train.lr narrowed to [1e-3, 1e-2] and train.batch_size out."""
    text = QUICKSTART.read_text()
    text = text.replace("name: quickstart", "name: narrow")
    text = text.replace(
        "{float: [1.0e-4, 1.0e-1], log: true}", "{float: [1.0e-3, 1.0e-2], log: true}"
    )
    text = text.replace("    train.batch_size: {categorical: [16, 32]}\n", "")
    text = text.replace(
        "aug.policy: {categorical: [none, crop]}", "aug.policy: {categorical: [none]}"
    )
    path = tmp_path / "narrow.yaml"
    path.write_text(text)
    return path


def _source(folder, direction="maximize", objective="val_acc", n_plain=0):
    """A journal study of the quickstart space, its trials made by hand: a baseline, one in
    range (with train.batch_size), one above the narrow lr range, one with aug.policy crop, a
    pruned one, one handed over to it by an earlier warm start; then `n_plain` in range."""
    folder.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(folder / "optuna.journal")))
    study = optuna.create_study(study_name="src", storage=storage, direction=direction)
    study.set_user_attr(Tag.OBJECTIVES, [objective])
    study.set_user_attr(Tag.TASK_KIND, "finetune")
    study.set_user_attr(Tag.DATA_HASH, "abc")

    def add(params, value=0.5, state=TrialState.COMPLETE, **attrs):
        dists = {"train.lr": LR, "aug.policy": AUG, "train.batch_size": BATCH}
        study.add_trial(
            create_trial(
                state=state,
                value=value if state == TrialState.COMPLETE else None,
                params=params,
                distributions={k: dists[k] for k in params},
                user_attrs={"val_acc": value, **attrs},
            )
        )

    add({}, 0.3, **{Tag.BASELINE: True})
    add({"train.lr": 0.005, "aug.policy": "none", "train.batch_size": 16}, 0.8)
    add({"train.lr": 0.05, "aug.policy": "none"}, 0.7)
    add({"train.lr": 0.005, "aug.policy": "crop"}, 0.6)
    add({"train.lr": 0.004}, state=TrialState.PRUNED)
    add({"train.lr": 0.003, "aug.policy": "none"}, 0.9, **{Tag.WARM_START: "x trial 0"})
    for i in range(n_plain):
        add({"train.lr": 0.002 + 0.0005 * i, "aug.policy": "none"}, 0.5 + 0.01 * i)
    return folder


def test_hands_over_exactly_the_compatible_trials(tmp_path):
    src = _source(tmp_path / "src")
    spec = load_spec(_narrow(tmp_path), [f"search.warm_start=[src@{src}]"])
    out = warm.gather(spec, StudyOptions(results=tmp_path / "new"))
    assert [t.params for t in out.trials] == [
        {"train.lr": 0.005, "aug.policy": "none"},  # train.batch_size dropped
        {"train.lr": 0.01, "aug.policy": "none"},  # 0.05 clipped to the new high end
    ]
    assert [t.value for t in out.trials] == [0.8, 0.7]
    assert out.dropped == {"train.batch_size": 1} and out.clipped == {"train.lr": 1}
    assert (out.skipped, out.not_complete, out.baseline) == (1, 1, 1)  # crop; pruned; baseline
    assert [t.user_attrs[Tag.WARM_START] for t in out.trials] == [
        f"src@{src} trial 1",
        f"src@{src} trial 2",
    ]
    assert out.sources == [{"source": f"src@{src}", "trials": 2, "data": "abc"}]
    assert out.line() == (
        f"warm start: 2 complete trials of src@{src} (2) handed to the sampler; 1 values dropped "
        "(not in this space: train.batch_size); 1 values clipped into this space's range "
        "(train.lr); 1 trials skipped (a choice or no key of this space); 1 not complete and 1 "
        "baseline trials not used"
    )
    assert warm.data_notes(out.sources, "abc") == []
    assert "used other data" in warm.data_notes(out.sources, "other")[0]
    assert not (tmp_path / "new").exists()  # reading the sources creates nothing


def test_warm_started_sampler_suggests_otherwise_than_a_cold_one(tmp_path):
    src = _source(tmp_path / "src", n_plain=8)
    spec = load_spec(QUICKSTART, [f"search.warm_start=[src@{src}]"])
    handed = warm.gather(spec, StudyOptions(results=tmp_path)).trials
    assert len(handed) == 11  # 2 + 1 with crop (in the quickstart space) + 8 plain

    def first(trials) -> dict:
        study = optuna.create_study(direction="maximize", sampler=make_sampler(spec))
        study.add_trials(trials)
        return suggest(study.ask(), spec)

    assert first([]) == first([])  # the same seed: the same first suggestion
    assert first(handed) != first([])  # the history moved it


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("src@{src}", "its objective is minimize val_acc, this study's is maximize val_acc"),
        ("nosuch@{src}", "no study 'nosuch' in"),
        ("src@{tmp}/nowhere", "no Optuna journal at"),
        ("src@postgresql://nobody@127.0.0.1:1/none", "cannot open the Optuna storage"),
    ],
)
def test_refused_before_anything_is_created(tmp_path, capsys, source, message):
    src = _source(tmp_path / "src", direction="minimize")
    results = tmp_path / "new"
    named = source.format(src=src, tmp=tmp_path)
    code = cli.main([str(QUICKSTART), "--results", str(results), "--warm-start", named])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and err.startswith("error: ") and message in err
    assert not results.exists()


def test_refused_with_the_grid_sampler(capsys):
    experiment = REPO / "experiments" / "digits_transfer_compare.yaml"
    assert cli.main(["check", str(experiment), "--set", "search.warm_start=[a]"]) == 2
    assert "the grid sampler visits every point" in capsys.readouterr().err


@pytest.mark.slow
def test_warm_study_keeps_its_own_budget_and_records(tmp_path, tiny_studies, source_cache):
    copy = tmp_path / "copied"  # the earlier study's results folder, copied elsewhere
    shutil.copytree(tiny_studies, copy)
    before, copied = tree_state(tiny_studies), tree_state(copy)
    results = tmp_path / "results"
    shutil.copytree(source_cache, results / "sources")
    args = tiny_study_args(QUICKSTART, results, 2, "--study-name", "warm")
    proc = run_cli(*args, "--warm-start", f"quickstart@{copy}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    source = optuna.load_study(
        study_name="quickstart",
        storage=JournalStorage(JournalFileBackend(str(copy / "optuna.journal"))),
    )
    sampled = [t for t in source.trials if t.state.name == "COMPLETE" and t.params]
    assert f"warm start: {len(sampled)} complete trials of quickstart@{copy}" in proc.stdout
    assert tree_state(tiny_studies) == before and tree_state(copy) == copied  # only read

    storage = JournalStorage(JournalFileBackend(str(results / "optuna.journal")))
    study = optuna.load_study(study_name="warm", storage=storage)
    handed = [t for t in study.trials if Tag.WARM_START in t.user_attrs]
    own = [t for t in study.trials if Tag.WARM_START not in t.user_attrs]
    assert [t.params for t in handed] == [t.params for t in sampled]
    assert [t.value for t in handed] == [t.value for t in sampled]
    assert len(own) == 2 and all(t.state.name == "COMPLETE" for t in own)  # its own budget
    assert own[0].user_attrs.get(Tag.BASELINE) and own[0].number == 0  # the baseline first
    assert all("mlflow_run_id" not in t.user_attrs for t in handed)

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([exp.experiment_id])
    trial_runs = [r for r in runs if Tag.OPTUNA_TRIAL_NUMBER in r.data.tags]
    assert sorted(int(r.data.tags[Tag.OPTUNA_TRIAL_NUMBER]) for r in trial_runs) == sorted(
        t.number for t in own
    )
    parent = next(r for r in runs if r.data.tags.get(Tag.ROLE) == "study")
    tag = parent.data.tags[Tag.WARM_START_FROM]
    assert tag == f"quickstart@{copy} ({len(sampled)} trials)"
    assert parent.data.metrics["trials_complete"] == 2
    report = (results / "reports" / "warm" / "report.md").read_text()
    assert "Study 'warm': 2 complete, 0 pruned, 0 failed" in report
    assert f"Warm-started from quickstart@{copy} ({len(sampled)} trials)" in report


def test_several_sources_add_up(tmp_path):
    a, b = _source(tmp_path / "a"), _source(tmp_path / "b", n_plain=3)
    spec = load_spec(QUICKSTART, [f"search.warm_start=[src@{a}, src@{b}/optuna.journal]"])
    out = warm.gather(spec, StudyOptions(results=tmp_path / "new"))
    assert [s["trials"] for s in out.sources] == [3, 6]  # the crop trial is in this space
    assert len(out.trials) == 9 and out.baseline == 2 and out.not_complete == 2
    assert out.sources[1]["source"] == f"src@{b}/optuna.journal"
