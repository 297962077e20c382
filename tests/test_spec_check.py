"""The `check` command (what it prints, what it refuses, what it imports), unknown keys and their
close matches, and the options of fine-tuning, regularization, models and data that a file may
set."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_spec import QUICKSTART, REPO, RUN_STUDY, quickstart_tree, write_tree

from harness.config.load import load_spec
from harness.config.spec import (
    SpecError,
    baseline_config,
)


def _check(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(RUN_STUDY), "check", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_quickstart_prints_space_and_creates_nothing(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    result = _check(str(QUICKSTART), "--results", str(work / "res"), cwd=work)
    assert result.returncode == 0, result.stderr
    assert f"{QUICKSTART}: valid" in result.stdout
    space = load_spec(QUICKSTART).search.space
    assert f"search space ({len(space)} keys):" in result.stdout
    for key in space:
        assert f"  {key}: " in result.stdout
    assert list(work.iterdir()) == []


def _printed_config(stdout: str) -> dict:
    """The resolved config `check` prints: the YAML between `valid` and the search space."""
    lines = stdout.splitlines()[1:]
    end = next(i for i, line in enumerate(lines) if line.startswith(("(", "search space")))
    return yaml.safe_load("\n".join(lines[:end]))


@pytest.mark.parametrize(
    ("name", "shown", "hidden"),
    [
        ("quickstart", ("train", "strategy"), ("meta", "multitask")),
        ("digits_meta", ("meta",), ("multitask", "strategy", "reg", "aug")),
        ("digits_multitask", ("multitask", "train"), ("meta", "strategy")),
    ],
)
def test_check_prints_every_key_with_its_default_and_only_the_sections_of_its_kind(
    name, shown, hidden
):
    path = REPO / "experiments" / f"{name}.yaml"
    result = _check(str(path), cwd=REPO)
    assert result.returncode == 0, result.stderr
    tree = _printed_config(result.stdout)
    for section in shown:
        assert section in tree
        assert f"{section}:" in result.stdout
    for section in hidden:
        assert section not in tree
        assert not any(line.startswith(f"{section}:") for line in result.stdout.splitlines())
    for key in ("test_per_class", "image_size", "split_seed"):  # null defaults are printed
        assert key in tree["data"] and tree["data"][key] is None
    assert "threads" in tree["train"] and tree["train"]["threads"] is None
    assert "metrics" in tree["objective"] and tree["objective"]["metrics"] is None


def test_check_bad_file_exits_2_with_short_message(tmp_path):
    tree = quickstart_tree()
    tree["train"]["lrr"] = 0.1
    path = write_tree(tmp_path, tree)
    result = _check(str(path), cwd=REPO)
    assert result.returncode == 2
    assert result.stdout == ""
    err = result.stderr.strip()
    assert err.startswith("error: ")
    assert len(err.splitlines()) <= 2
    assert str(path) in err
    assert "train.lrr" in err
    assert "Traceback" not in err


def test_check_imports_no_torch_optuna_or_mlflow():
    code = (
        "import sys; from harness.cli import main; "
        f"rc = main(['check', {str(QUICKSTART)!r}]); "
        "print(rc, sorted(m for m in ('torch', 'optuna', 'mlflow') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "0 []"


@pytest.mark.parametrize(
    ("edit", "hint"),
    [
        (lambda t: t.update(trian=t.pop("train")), "train"),
        (lambda t: t["search"].update(n_trial=t["search"].pop("n_trials")), "n_trials"),
        (lambda t: t["search"]["space"]["train.lr"].update(flot=[0.1, 0.2]), "float"),
    ],
    ids=["top_level", "search_section", "space_entry"],
)
def test_unknown_keys_get_close_matches_at_every_level(tmp_path, edit, hint):
    tree = quickstart_tree()
    edit(tree)
    with pytest.raises(SpecError, match=rf"unknown key \(did you mean {hint}"):
        load_spec(write_tree(tmp_path, tree))


def test_flips_are_refused_for_digits(tmp_path):
    with pytest.raises(SpecError, match=r"aug.policy: flip_crop flips images.*mirrored 2"):
        load_spec(QUICKSTART, ["aug.policy=flip_crop"])
    tree = quickstart_tree()
    tree["search"]["space"]["aug.policy"] = {"categorical": ["none", "flip_crop"]}
    with pytest.raises(SpecError, match=r"search.space.aug.policy: value 'flip_crop'"):
        load_spec(write_tree(tmp_path, tree))


def test_flips_are_allowed_for_cifar():
    spec = load_spec(REPO / "experiments" / "cifar10_resnet50.yaml", ["aug.policy=flip_crop"])
    assert spec.aug.policy == "flip_crop"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.arch=resnet5", r"unknown model 'resnet5' \(did you mean resnet50"),
        ("model.pretrained=imagenet", "imagenet weights exist for torchvision models only"),
        ("model.weights=imagenet1k_v1", "model.weights"),
        ("strategy.lp_epochs=30", "strategy.lp_epochs: 30 leaves no fine-tuning epoch"),
        ("strategy.kind=lp_ftt", "strategy.kind"),
        ("reg.ema_decay=1.0", "reg.ema_decay"),
        ("reg.l2_sp=-0.1", "reg.l2_sp"),
        ("data.target_classes=[cat, dog]", "digits classes are indices"),
        ("data.source_classes=[5]", r"source_classes and target_classes share \[5\]"),
    ],
)
def test_option_errors_name_the_key(override, message):
    with pytest.raises(SpecError, match=message):
        load_spec(QUICKSTART, ["strategy.kind=lp_ft", override])


def test_overlapping_classes_are_fine_without_source_pretraining():
    spec = load_spec(QUICKSTART, ["model.pretrained=none", "data.source_classes=[5, 6]"])
    assert spec.data.source_classes == (5, 6)


def test_pretrained_kinds():
    kinds = {
        "none": "none",
        "source": "source",
        "models:/source-x/1": "mlflow",
        "runs:/abc/source/w.pt": "mlflow",
        "weights/my.pt": "file",
    }
    for value, kind in kinds.items():
        assert load_spec(QUICKSTART, [f"model.pretrained={value}"]).model.pretrained_kind == kind


def test_torchvision_arch_list_matches_torchvision():
    import torchvision

    from harness.config.spec import TORCHVISION_ARCHS

    listed = torchvision.models.list_models(module=torchvision.models)
    assert sorted(TORCHVISION_ARCHS) == sorted(listed)


def test_baseline_turns_every_method_off(tmp_path):
    spec = load_spec(REPO / "experiments" / "digits_regularization.yaml")
    base = baseline_config(spec)
    reg = base.reg.model_dump()
    assert all(reg[k] == 0.0 for k in reg if k != "decay_norm_bias"), reg
    assert base.strategy.kind == "full" and base.strategy.layer_decay == 1.0
    assert base.strategy.head_lr_mult == 1.0 and base.strategy.bn == "train"
    assert base.aug.policy == "none"
    assert (base.train.optimizer, base.train.lr, base.train.momentum) == ("sgd", 0.001, 0.9)
    assert base.train.batch_size == 32 and base.train.epochs == spec.train.epochs


def test_stochastic_depth_only_where_torchvision_has_it():
    with pytest.raises(SpecError, match="reg.stochastic_depth: small_cnn has no stochastic depth"):
        load_spec(QUICKSTART, ["reg.stochastic_depth=0.1"])
    spec = load_spec(
        QUICKSTART,
        ["model.arch=convnext_tiny", "model.pretrained=none", "reg.stochastic_depth=0.1"],
    )
    assert spec.reg.stochastic_depth == 0.1
