"""The shipped experiment files run: the founding case study on a tiny CIFAR-10 folder."""

from __future__ import annotations

import mlflow
import pytest
import torch
import torchvision
from conftest import REPO
from test_data import write_cifar10

from harness import cli
from harness.config.load import load_spec
from harness.core import models

pytestmark = pytest.mark.slow


def test_cifar10_resnet50_case_study_runs_end_to_end(tmp_path, monkeypatch, capsys):
    # CIFAR-10 in its real on-disk format (only the md5 check is patched), and a random
    # ResNet50 state_dict standing in the hub cache where torchvision reads IMAGENET1K_V1.
    data_root = tmp_path / "data"
    write_cifar10(data_root, per_class_train=6, per_class_test=2)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    experiment = REPO / "experiments" / "cifar10_resnet50.yaml"
    spec = load_spec(experiment)
    weights_file = models.weights_path(models.imagenet_weights(spec.model))
    weights_file.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50().state_dict(), weights_file)

    results = tmp_path / "results"
    overrides = {
        "data.root": str(data_root),
        "data.download": "false",
        "data.shots_per_class": "3",
        "data.val_per_class": "2",
        "data.image_size": "64",  # the weights' 224 px costs minutes on 2 CPU cores
        "train.epochs": "2",
        "strategy.lp_epochs": "1",  # pinned: lp_ft needs an epoch left to fine-tune
    }
    argv = [str(experiment), "--results", str(results), "--n-trials", "1", "--quiet"]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "baseline recipe" in out and "Test split (baseline" in out

    mlflow.set_tracking_uri(f"sqlite:///{results / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["cifar10-resnet50"], output_format="list")
    trials = [r for r in runs if "optuna.trial_number" in r.data.tags]
    assert len(trials) == 1
    run = trials[0]
    assert run.info.status == "FINISHED" and run.data.tags["harness.baseline"] == "true"
    assert run.data.tags["harness.pretrained"] == "torchvision:resnet50.IMAGENET1K_V1"
    assert run.data.params["model.arch"] == "resnet50"
    assert run.data.params["train.lr"] == "0.001" and run.data.params["train.batch_size"] == "32"
    assert 0.0 <= run.data.metrics["test_acc"] <= 1.0


def test_cifar10_resnet50_offline_without_weights_is_a_clear_error(tmp_path, monkeypatch, capsys):
    data_root = tmp_path / "data"
    write_cifar10(data_root, per_class_train=4, per_class_test=1)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    import urllib.error

    import torch.hub

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    experiment = REPO / "experiments" / "cifar10_resnet50.yaml"
    argv = [
        str(experiment),
        "--results",
        str(tmp_path / "results"),
        "--n-trials",
        "1",
        "--set",
        f"data.root={data_root}",
        "--set",
        "data.download=false",
        "--set",
        "data.shots_per_class=2",
        "--set",
        "data.val_per_class=1",
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-") in err
    assert not (tmp_path / "results").exists()  # no store was created


def test_missing_data_root_is_an_input_error_and_creates_nothing(tmp_path, capsys):
    experiment = REPO / "experiments" / "cifar10_resnet50.yaml"
    results = tmp_path / "results"
    argv = [
        str(experiment),
        "--results",
        str(results),
        "--set",
        f"data.root={tmp_path / 'nowhere'}",
        "--set",
        "data.download=false",
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "data.root" in err and "nowhere" in err and "data.download: true" in err
    assert not results.exists()


def test_k_shot_larger_than_a_class_is_an_input_error(tmp_path, capsys):
    argv = [
        str(REPO / "experiments" / "quickstart.yaml"),
        "--results",
        str(tmp_path / "r"),
        "--set",
        "data.shots_per_class=170",
        "--set",
        "data.val_per_class=30",
    ]
    assert cli.main(argv) == 2
    assert "shots_per_class" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


LATE_INPUTS = {  # an input error once found only after a store was created, or as a traceback
    "unknown_weights": (
        ["model.arch=resnet18", "model.pretrained=imagenet", "model.weights=NOPE"],
        "model.weights: 'NOPE' is not a weights of resnet18",
    ),
    "missing_file": (["model.pretrained=/nonexistent/w.pt"], "no such state_dict file"),
    "registry_without_store": (
        ["model.pretrained=models:/nope@best"],
        "model.pretrained: models:/nope@best: there is no MLflow store at",
    ),
}


@pytest.mark.parametrize("case", sorted(LATE_INPUTS))
def test_late_bad_inputs_exit_2_and_create_nothing(tmp_path, capsys, case):
    overrides, message = LATE_INPUTS[case]
    results = tmp_path / "results"
    argv = [str(REPO / "experiments" / "quickstart.yaml"), "--results", str(results)]
    for s in overrides:
        argv += ["--set", s]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not results.exists()


def test_an_unknown_registry_model_in_an_existing_store_is_refused_before_the_study(
    tmp_path, capsys
):
    """The store exists (another study's); the model does not: exit 2, the store untouched."""
    results = tmp_path / "results"
    results.mkdir()
    client = mlflow.MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    client.search_experiments()  # creates the store, as an earlier study would have
    before = sorted(p.name for p in results.iterdir())
    argv = [str(REPO / "experiments" / "quickstart.yaml"), "--results", str(results)]
    argv += ["--set", "model.pretrained=models:/nope@best"]
    assert cli.main(argv) == 2
    assert "cannot resolve models:/nope@best" in capsys.readouterr().err
    assert sorted(p.name for p in results.iterdir()) == before
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_an_experiment_file_that_is_not_utf8_exits_2_naming_it(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"name: x\nseed: 0\n# caf\xe9\n")
    for argv in ([str(path), "--results", str(tmp_path / "r")], ["check", str(path)]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert f"{path}: not UTF-8 text (byte 0xe9 at offset 21)" in err
    assert not (tmp_path / "r").exists()


def test_fields_added_later_leave_old_studies_hashes_alone():
    """A study made before `search.soup` or `reg.swa_*` existed still opens with its file: a
    field added later stays out of the spec hash while at its default (hashes recorded before)."""
    from harness.config.load import spec_hash

    recorded = {"quickstart": "637e94274f6e8b5a", "digits_multitask": "fd8b20ffba9bd30c"}
    for name, digest in recorded.items():
        assert spec_hash(load_spec(REPO / "experiments" / f"{name}.yaml")) == digest, name
    quick = REPO / "experiments" / "quickstart.yaml"
    assert spec_hash(load_spec(quick, ["search.soup=uniform"])) != recorded["quickstart"]
