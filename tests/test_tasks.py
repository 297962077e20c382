"""Meta-learning, multi-task and transfer studies: their experiment-file sections, the dispatch
of a trial to its core (`harness.core.tasks`), and studies of each kind end to end, read back
through MLflow's and Optuna's own APIs."""

from __future__ import annotations

import textwrap

import mlflow
import optuna
import pytest
import torch
import torchvision.datasets as tvd
import yaml
from conftest import REPO, run_cli
from mlflow import MlflowClient
from test_data import balanced_labels, distinct_images, py2, write_py2_pickle

from harness.config.load import load_spec
from harness.config.spec import SpecError, trial_config
from harness.core import meta, models, tasks

META_FILE = REPO / "experiments" / "digits_meta.yaml"
MULTI_FILE = REPO / "experiments" / "digits_multitask.yaml"
COMPARE_FILE = REPO / "experiments" / "digits_transfer_compare.yaml"
CIFAR_FS_FILE = REPO / "experiments" / "cifar_fs_meta.yaml"
# A meta study of seconds: two meta-epochs of a few episodes, a small network.
META_TINY = [
    "model.width=8",
    "meta.meta_epochs=2",
    "meta.episodes_per_epoch=4",
    "meta.val_episodes=6",
    "meta.test_episodes=10",
]


def write(tmp_path, text: str, name: str = "exp.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


META_SPEC = """
    name: m
    task: {kind: meta}
    model: {pretrained: none}
    search:
      baseline: false
      space:
        meta.algorithm: {categorical: [protonet, maml]}
"""


# --- The experiment file. ---
def test_meta_study_defaults_to_meta_val_acc(tmp_path):
    spec = load_spec(write(tmp_path, META_SPEC))
    assert spec.objective.metric == "meta_val_acc"
    assert spec.epochs == spec.meta.meta_epochs


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("search.baseline=true", "search.baseline: the founding recipe is a fine-tuning"),
        ("model.pretrained=source", "source pretrains on data.source_classes"),
        ("train.lr=0.1", "train.lr: no effect in a meta-learning study"),
        ("reg.dropout=0.2", "reg.dropout: no effect in a meta-learning study"),
        ("objective.metric=val_acc", "a meta-learning study optimises meta_val_acc"),
        ("meta.ways=5", "5-way tasks need 5 meta-train classes; the split has 4"),
        ("meta.eval_ways=4", "4-way tasks need 4 meta-val classes; the split has 3"),
        ("data.dataset=mnist", "mnist has no standard meta-learning split"),
        ("meta.train_classes=[0, 1]", "give all three or none"),
    ],
)
def test_meta_study_refuses_what_it_cannot_honour(tmp_path, override, message):
    with pytest.raises(SpecError, match=message):
        load_spec(write(tmp_path, META_SPEC), [override])


def test_meta_split_sizes_match_the_core():
    from harness.config.spec import META_SPLIT_SIZES

    for dataset, split in (("digits", meta.DIGITS_SPLIT), ("cifar100", meta.CIFAR_FS_SPLIT)):
        assert META_SPLIT_SIZES[dataset] == (len(split.train), len(split.val), len(split.test))


def test_meta_metrics_need_a_meta_study(tmp_path):
    path = write(
        tmp_path,
        """
        name: f
        objective: {metric: meta_val_acc}
        search: {space: {train.lr: {float: [0.001, 0.1]}}}
        """,
    )
    with pytest.raises(SpecError, match="meta_\\* metrics need task.kind: meta"):
        load_spec(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("multitask.tasks={}", "needs at least one auxiliary task"),
        ("multitask.tasks.parity.groups=[[5, 7], [6, 8]]", r"missing \[9\]"),
        ("multitask.tasks.parity.groups=[[5, 7, 9, 1], [6, 8]]", r"not target classes \[1\]"),
        ("multitask.tasks.parity.groups=[[5, 6, 7, 8, 9]]", "two or more groups"),
        ("reg.l2_sp=0.1", "reg.l2_sp: not supported in a multi-task study"),
        ("strategy.kind=linear_probe", "strategy.kind: not supported"),
        ("train.compile=true", "train.compile: not supported in a multi-task study"),
    ],
)
def test_multitask_file_errors(override, message):
    with pytest.raises(SpecError, match=message):
        load_spec(MULTI_FILE, [override])


def test_aux_task_weights_are_searchable_and_labels_follow_the_groups():
    spec = load_spec(MULTI_FILE)
    assert "multitask.tasks.parity.weight" in spec.search.space
    config = trial_config(
        spec, {"multitask.weighting": "fixed", "multitask.tasks.parity.weight": 0.25}
    )
    target, parity, gt7 = tasks.aux_tasks(config)
    assert (target.name, parity.name, gt7.name) == ("target", "parity", "gt7")
    assert parity.weight == 0.25 and gt7.weight == 0.5
    y = torch.arange(5)  # labels of the target classes 5, 6, 7, 8, 9
    assert parity.targets(y, "train").tolist() == [0, 1, 0, 1, 0]  # odd digits: group 0
    assert gt7.targets(y, "train").tolist() == [0, 0, 0, 1, 1]


def test_multitask_baseline_is_the_plain_recipe():
    from harness.config.spec import baseline_config

    base = baseline_config(load_spec(MULTI_FILE))
    assert base.task.kind == "finetune" and base.train.lr == 0.001


@pytest.mark.parametrize(
    ("enqueue", "message"),
    [
        ("[{meta.algorithm: snail}]", r"meta.algorithm='snail' is not one of"),
        ("[{meta.meta_lr: 5.0}]", r"meta.meta_lr=5.0 is outside \[0.0001, 0.01\]"),
        ("[{train.lr: 0.1}]", "train.lr is not a key of search.space"),
    ],
)
def test_enqueued_trials_are_checked(enqueue, message):
    with pytest.raises(SpecError, match=rf"search.enqueue\[0\]: {message}"):
        load_spec(META_FILE, [f"search.enqueue={enqueue}"])


def test_grid_sampler_needs_categorical_keys_and_a_budget_within_the_grid(tmp_path):
    spec = load_spec(COMPARE_FILE)
    assert spec.search.n_trials == 3 * 3 * 5 + 1
    with pytest.raises(SpecError, match="the grid has 45 points"):
        load_spec(COMPARE_FILE, ["search.n_trials=47"])
    path = write(
        tmp_path,
        """
        name: g
        search:
          sampler: grid
          space: {train.lr: {float: [0.001, 0.1]}}
        """,
    )
    with pytest.raises(SpecError, match="the grid sampler needs categorical keys"):
        load_spec(path)


# --- The dispatch. ---
def test_meta_trial_data_is_the_class_split_pool():
    config = trial_config(load_spec(META_FILE), {})
    pool = tasks.load_data(config)
    assert isinstance(pool, tasks.MetaPool)
    assert len(pool.x) == 1797 and sorted(set(pool.y.tolist())) == list(range(10))
    assert pool.split == meta.ClassSplit((0, 1, 2, 3), (4, 5, 6), (7, 8, 9))
    assert tasks.load_data(config).data_hash == pool.data_hash  # stable, for reproduce
    model = tasks.build(config, pool)
    head = [m for m in models.head_module(model).modules() if isinstance(m, torch.nn.Linear)]
    assert head[-1].out_features == 3  # the most ways a trial of this config uses


# --- End to end. ---
def _client(results, experiment: str):
    uri = f"sqlite:///{results / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    return MlflowClient(uri), [r for r in runs if "optuna.trial_number" in r.data.tags]


@pytest.fixture(scope="module")
def meta_study(tmp_path_factory):
    """digits_meta.yaml, tiny: its first two trials, the enqueued ProtoNets and MAML ones."""
    folder = tmp_path_factory.mktemp("meta")
    results = folder / "results"
    args = [str(META_FILE), "--results", str(results), "--n-trials", "2", "--quiet"]
    pinned = ["meta.inner_lr=0.4", "meta.inner_steps=1", "meta.meta_lr=0.001"]
    pinned += ["meta.meta_batch_size=2", "meta.shots=1", "meta.ways=3"]
    for s in [*META_TINY, *pinned]:
        args += ["--set", s]
    return results, run_cli(*args, cwd=folder)


@pytest.mark.slow
def test_meta_study_end_to_end(meta_study):
    results, done = meta_study
    assert done.returncode == 0, done.stderr
    assert "meta_val_acc" in done.stdout and "No baseline trial" in done.stdout
    assert "Meta-test classes (best trial" in done.stdout and "5-shot" in done.stdout
    client, runs = _client(results, "digits_meta")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.params["meta.algorithm"] for r in runs} == {"maml", "protonet"}
    for r in runs:
        for key in ("meta_train_acc", "meta_val_acc", "meta_val_ci95", "adaptation_gap"):
            history = client.get_metric_history(r.info.run_id, key)
            assert [m.step for m in history] == [1, 2], key
        gap = r.data.metrics["adaptation_gap"]
        assert gap == pytest.approx(
            r.data.metrics["meta_train_acc"] - r.data.metrics["meta_val_acc"]
        )
    assert "Meta-test per algorithm" in done.stdout
    for algorithm in ("maml", "protonet"):  # each algorithm's best trial, meta-tested once
        assert f"{algorithm:>8} (trial " in done.stdout
    assert all("meta_test_acc_1shot" in r.data.metrics for r in runs)
    for r in runs:
        m = r.data.metrics
        assert 0 < m["meta_test_acc_1shot"] <= 1 and 0 < m["meta_test_ci95_5shot"] < 0.5
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = JournalStorage(JournalFileBackend(str(results / "optuna.journal")))
    study = optuna.load_study(study_name="digits_meta", storage=storage)
    best_run = study.best_trial.user_attrs["mlflow_run_id"]
    version = client.get_model_version_by_alias("digits_meta", "best")
    assert version.run_id == best_run


@pytest.mark.slow
def test_meta_init_is_a_pretrained_start_in_a_transfer_grid(meta_study, tmp_path):
    """The registered meta-learned init, scratch and source pretraining in one grid study:
    each setting over two seeds, every trial tested, the report grouped over seeds."""
    results, done = meta_study
    assert done.returncode == 0, done.stderr
    args = [str(COMPARE_FILE), "--results", str(results), "--quiet", "--n-trials", "13"]
    for s in (
        "model.width=8",
        "model.source_epochs=2",
        "train.epochs=2",
        "search.baseline=false",
    ):
        args += ["--set", s]
    spec_text = COMPARE_FILE.read_text().replace(
        "data.shots_per_class: {categorical: [1, 5, 20]}",
        "data.shots_per_class: {categorical: [1, 5]}",
    )
    spec_text = spec_text.replace("categorical: [0, 1, 2, 3, 4]", "categorical: [0, 1]")
    spec_text = spec_text.replace("n_trials: 46", "n_trials: 12")
    compare = tmp_path / "compare.yaml"
    compare.write_text(spec_text)
    args[0] = str(compare)
    out = run_cli(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Over seeds (each setting's complete trials; test_acc mean ± std)" in out.stdout
    for setting in ("none", "source", "models:/digits_meta@best"):
        for shots in (1, 5):
            line = f"data.shots_per_class={shots} model.pretrained={setting}: "
            assert line in out.stdout and "(n=2)" in out.stdout.split(line)[1].split("\n")[0]
    client, runs = _client(results, "digits_transfer_compare")
    assert len(runs) == 12 and all("test_acc" in r.data.metrics for r in runs)
    meta_runs = [r for r in runs if r.data.params["model.pretrained"].endswith("@best")]
    assert {r.data.tags["harness.pretrained"] for r in meta_runs} == {"models:/digits_meta/1"}
    report = results / "reports" / "digits_transfer_compare"
    assert (report / "labels_curve.png").is_file()


@pytest.mark.slow
def test_a_missing_meta_init_fails_before_any_trial(tmp_path):
    out = run_cli(str(COMPARE_FILE), "--results", str(tmp_path / "r"), "--quiet", cwd=tmp_path)
    assert out.returncode == 2
    assert "models:/digits_meta@best" in out.stderr


@pytest.mark.slow
def test_multitask_study_end_to_end(tmp_path, results_dir):
    args = [str(MULTI_FILE), "--results", str(results_dir), "--n-trials", "3", "--quiet"]
    for s in ("model.source_epochs=3", "train.epochs=2", "search.pruner=none"):
        args += ["--set", s]
    done = run_cli(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Baseline (trial 0, the founding recipe)" in done.stdout
    client, runs = _client(results_dir, "digits_multitask")
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    base = next(r for r in runs if r.data.tags["harness.baseline"] == "true")
    assert base.data.params["task.kind"] == "finetune" and "parity_val_acc" not in base.data.metrics
    multi = [r for r in runs if r is not base]
    for r in multi:
        assert r.data.params["task.kind"] == "multitask"
        m = r.data.metrics
        for task in ("target", "parity", "gt7"):
            assert f"{task}_overfit_gap" in m and f"{task}_val_acc" in m
        assert m["val_acc"] == m["target_val_acc"]
        config = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{r.info.run_id}/config.yaml"))
        assert config["multitask"]["tasks"]["parity"]["groups"] == [[5, 7, 9], [6, 8]]
    again = run_cli("reproduce", multi[0].info.run_id, "--results", str(results_dir), cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "parity_val_acc" in again.stdout
    report = ["report", "digits_multitask", "--results", str(results_dir), "--seeds", "1"]
    assert run_cli(*report, cwd=tmp_path).returncode == 0
    reruns = _reruns(results_dir, "digits_multitask")
    assert reruns and all("best_val_acc" in r.data.metrics for r in reruns)
    assert run_cli(*report, cwd=tmp_path).returncode == 0  # reused: no run added
    assert len(_reruns(results_dir, "digits_multitask")) == len(reruns)


def _reruns(results, experiment: str) -> list:
    uri = f"sqlite:///{results / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    return [r for r in runs if r.data.tags.get("harness.role") == "seed_rerun"]


@pytest.mark.slow
def test_report_seeds_reuses_meta_reruns(meta_study, monkeypatch, capsys):
    """Meta re-runs log best_meta_val_acc: a second `report --seeds` trains nothing (it once
    looked for best_val_acc and trained every meta re-run again)."""
    from harness import cli
    from harness.core import tasks

    results, done = meta_study
    assert done.returncode == 0, done.stderr
    argv = ["report", "digits_meta", "--results", str(results), "--seeds", "1"]
    assert cli.main(argv) == 0
    first = _reruns(results, "digits_meta")
    assert first and all(r.info.status == "FINISHED" for r in first)
    assert all("best_meta_val_acc" in r.data.metrics for r in first)

    def no_training(*args, **kwargs):
        raise AssertionError("report --seeds trained a re-run it had already")

    monkeypatch.setattr(tasks, "train", no_training)
    assert cli.main(argv) == 0
    assert len(_reruns(results, "digits_meta")) == len(first)
    assert "Over 1 more training seeds" in capsys.readouterr().out


@pytest.mark.slow
def test_meta_trial_reproduces_bit_for_bit(meta_study, tmp_path):
    results, done = meta_study
    assert done.returncode == 0, done.stderr
    _, runs = _client(results, "digits_meta")
    maml = next(r for r in runs if r.data.params["meta.algorithm"] == "maml")
    out = run_cli("reproduce", maml.info.run_id, "--results", str(results), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "meta_val_acc" in out.stdout and "match" in out.stdout


# --- CIFAR-FS on a tiny CIFAR-100-format folder. ---
def write_cifar100_named(root, per_class: int) -> None:
    """CIFAR-100's python files (torchvision's format) with the real fine class names."""
    rng = __import__("numpy").random.default_rng(0)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name in ("train", "test"):
        y = balanced_labels(rng, 100, per_class)
        entry = {
            "filenames": [f"{name}_{i}.png" for i in range(len(y))],
            "batch_label": f"{name} batch",
            "fine_labels": y.tolist(),
            "coarse_labels": (y // 5).tolist(),
            "data": distinct_images(rng, len(y), (3072,)),
        }
        write_py2_pickle(folder / name, py2(entry))
    names = {"fine_label_names": list(meta.CIFAR100_CLASSES), "coarse_label_names": ["c"] * 20}
    write_py2_pickle(folder / "meta", py2(names))


@pytest.mark.slow
def test_cifar_fs_study_runs_on_a_tiny_cifar100_folder(tmp_path, monkeypatch):
    from harness import cli

    monkeypatch.setattr(tvd.CIFAR10, "_check_integrity", lambda self: True)  # not the real md5
    monkeypatch.setattr(tvd.cifar, "check_integrity", lambda *args, **kwargs: True)
    write_cifar100_named(tmp_path / "data", per_class=6)
    results = tmp_path / "results"
    overrides = [
        f"data.root={tmp_path / 'data'}",
        "model.width=8",
        "meta.queries=2",
        "meta.eval_queries=2",
        "meta.meta_epochs=1",
        "meta.episodes_per_epoch=2",
        "meta.val_episodes=2",
        "meta.test_episodes=4",
        "meta.test_shots=[1, 3]",
        "meta.algorithm=protonet",
        "meta.shots=1",
    ]
    argv = [str(CIFAR_FS_FILE), "--results", str(results), "--n-trials", "1", "--quiet"]
    for s in overrides:
        argv += ["--set", s]
    assert cli.main(argv) == 0
    _, runs = _client(results, "cifar_fs_meta")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    m = runs[0].data.metrics
    assert "meta_val_acc" in m and "meta_test_acc_1shot" in m and "meta_test_acc_3shot" in m
