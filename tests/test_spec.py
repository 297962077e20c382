"""Tests of harness.config.spec (experiment files, --set overrides, trial configs) and `check`."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from harness.config.load import load_spec, parse_yaml, spec_hash
from harness.config.spec import (
    ExperimentSpec,
    SpecError,
    TrialConfig,
    active,
    baseline_config,
    fixed_values,
    trial_config,
)

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = REPO / "experiments"
QUICKSTART = EXPERIMENTS / "quickstart.yaml"
RUN_STUDY = REPO / "run_study.py"
EXPERIMENT_FILES = sorted(EXPERIMENTS.glob("*.yaml"))

# A small file with a conditional parameter: dropout is searched only for full fine-tuning.
COND_YAML = """\
name: cond
train:
  epochs: 2
  lr: 1e-3
search:
  n_trials: 3
  space:
    strategy.kind: {categorical: [full, linear_probe]}
    reg.dropout: {float: [0.0, 0.5], when: {strategy.kind: full}}
    train.lr: {float: [1e-4, 1e-1], log: true}
"""


def quickstart_tree() -> dict:
    return yaml.safe_load(QUICKSTART.read_text())


def write_tree(tmp_path: Path, tree: dict, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


@pytest.fixture
def cond_file(tmp_path: Path) -> Path:
    path = tmp_path / "cond.yaml"
    path.write_text(COND_YAML)
    return path


# --- 1. Every shipped experiment file loads. ---
def test_experiments_folder_has_files():
    assert QUICKSTART in EXPERIMENT_FILES


@pytest.mark.parametrize("path", EXPERIMENT_FILES, ids=lambda p: p.name)
def test_experiment_file_loads(path: Path):
    spec = load_spec(path)
    assert isinstance(spec, ExperimentSpec)
    assert spec.search.space, "a shipped experiment searches at least one key"
    assert isinstance(baseline_config(spec), TrialConfig)


# --- 2. Bad files raise SpecError naming the file, the key and the problem. ---
def _space(key: str, param: dict):
    return lambda t: t["search"]["space"].update({key: param})


BAD_FILES = {
    "unknown_key": (
        lambda t: t["train"].update(lrr=0.1),
        ["train.lrr", "unknown key", "did you mean lr"],
    ),
    "wrong_type": (
        lambda t: t["train"].update(epochs="three"),
        ["train.epochs", "valid integer", "'three'"],
    ),
    "negative_lr": (lambda t: t["train"].update(lr=-1), ["train.lr", "greater than 0"]),
    "zero_trials": (lambda t: t["search"].update(n_trials=0), ["search.n_trials"]),
    "empty_space": (lambda t: t["search"].update(space={}), ["search.space", "empty"]),
    "space_key_not_config_key": (
        _space("train.nope", {"float": [0.1, 0.2]}),
        ["search.space.train.nope", "not a key"],
    ),
    "space_name_not_searchable": (
        _space("name", {"categorical": ["a", "b"]}),
        ["search.space.name", "not a key"],
    ),
    "float_low_eq_high": (
        _space("reg.dropout", {"float": [0.5, 0.5]}),
        ["search.space.reg.dropout", "low < high"],
    ),
    "float_low_gt_high": (
        _space("reg.dropout", {"float": [0.5, 0.1]}),
        ["search.space.reg.dropout", "low < high"],
    ),
    "log_low_zero": (
        _space("reg.weight_decay", {"float": [0.0, 0.1], "log": True}),
        ["search.space.reg.weight_decay", "log", "positive"],
    ),
    "log_low_negative": (
        _space("reg.weight_decay", {"float": [-1.0, 0.1], "log": True}),
        ["search.space.reg.weight_decay", "log", "positive"],
    ),
    "range_end_invalid_for_field": (
        _space("train.lr", {"float": [-1, 1]}),
        ["search.space.train.lr", "-1", "train.lr", "greater than 0"],
    ),
    "range_high_end_invalid_for_field": (
        _space("train.momentum", {"float": [0.0, 1.0]}),
        ["search.space.train.momentum", "1.0", "less than 1"],
    ),
    "categorical_choice_invalid": (
        _space("train.optimizer", {"categorical": ["sgd", "lion"]}),
        ["search.space.train.optimizer", "'lion'"],
    ),
    "two_kinds": (
        _space("reg.dropout", {"float": [0.0, 0.5], "categorical": [0.1]}),
        ["search.space.reg.dropout", "exactly one"],
    ),
    "param_unknown_key": (
        _space("reg.dropout", {"flot": [0.0, 0.5]}),
        ["search.space.reg.dropout.flot", "unknown key"],
    ),
    "when_unknown_key": (
        _space("reg.dropout", {"float": [0.0, 0.5], "when": {"strategy.kindd": "full"}}),
        ["search.space.reg.dropout", "when", "strategy.kindd"],
    ),
    "when_value_not_a_choice": (
        _space("reg.dropout", {"float": [0.0, 0.5], "when": {"strategy.kind": "lora"}}),
        ["search.space.reg.dropout", "when", "strategy.kind", "'lora'", "linear_probe"],
    ),
    "when_key_listed_later": (
        _space("reg.dropout", {"float": [0.0, 0.5], "when": {"aug.policy": "none"}}),
        ["search.space.reg.dropout", "aug.policy", "before"],
    ),
    "objective_direction": (
        lambda t: t["objective"].update(metric="val_acc", direction="minimize"),
        ["objective", "direction", "val_acc", "maximize"],
    ),
    "overlapping_classes": (
        lambda t: t["data"].update(source_classes=[0, 1, 5]),
        ["data", "source_classes", "target_classes", "[5]"],
    ),
    "class_out_of_range": (
        lambda t: t["data"].update(source_classes=[0, 1, 10]),
        ["data", "source_classes", "[10]", "out of range"],
    ),
    "repeated_classes": (
        lambda t: t["data"].update(target_classes=[5, 5, 6]),
        ["data", "target_classes", "repeat"],
    ),
}


@pytest.mark.parametrize(("mutate", "expected"), BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_file_raises_spec_error(tmp_path, mutate, expected):
    tree = quickstart_tree()
    mutate(tree)
    path = write_tree(tmp_path, tree)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    msg = str(info.value)
    assert str(path) in msg
    for part in expected:
        assert part in msg


def test_quickstart_tree_round_trips_through_tmp_file(tmp_path):
    # The bad-file tests start from this tree; unmodified, it must load.
    spec = load_spec(write_tree(tmp_path, quickstart_tree()))
    assert spec_hash(spec) == spec_hash(load_spec(QUICKSTART))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: x\ntrain: [1, 2\n", "YAML syntax error"),
        ("name: x\n  train: {epochs: 1\n", "YAML syntax error"),
        ("- just\n- a list\n", "must be a mapping"),
        ("", "must be a mapping"),
    ],
    ids=["unclosed_flow", "bad_indent", "list", "empty"],
)
def test_unreadable_file_raises_spec_error(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=expected) as info:
        load_spec(path)
    assert str(path) in str(info.value)


def test_missing_file_raises_spec_error(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(SpecError, match="no such experiment file") as info:
        load_spec(path)
    assert str(path) in str(info.value)


def test_directory_is_not_an_experiment_file(tmp_path):
    with pytest.raises(SpecError, match="no such experiment file"):
        load_spec(tmp_path)


# --- Search-space steps and conditions on ranges. ---
@pytest.mark.parametrize(
    ("key", "param"),
    [
        ("train.batch_size", {"int": [16, 64], "step": 0.5}),
        ("reg.dropout", {"float": [0.0, 0.5], "step": 0}),
        ("reg.dropout", {"float": [0.0, 0.5], "step": -0.1}),
    ],
    ids=["int_step_half", "float_step_zero", "float_step_negative"],
)
def test_bad_step_raises_spec_error(tmp_path, key, param):
    tree = quickstart_tree()
    tree["search"]["space"][key] = param
    path = write_tree(tmp_path, tree)
    with pytest.raises(SpecError, match="step"):
        load_spec(path)


def test_when_value_outside_searched_range_raises(tmp_path):
    tree = quickstart_tree()
    # train.lr is searched in [1e-4, 1e-1]; 5.0 can never be sampled.
    tree["search"]["space"]["reg.dropout"] = {"float": [0.0, 0.5], "when": {"train.lr": 5.0}}
    path = write_tree(tmp_path, tree)
    with pytest.raises(SpecError, match="train.lr"):
        load_spec(path)


# --- 3. `1e-3` without a dot is a float. ---
def test_exponent_without_dot_is_float_in_file(cond_file):
    assert yaml.safe_load("lr: 1e-3") == {"lr": "1e-3"}  # the PyYAML behaviour worked around
    spec = load_spec(cond_file)
    assert isinstance(spec.train.lr, float)
    assert spec.train.lr == pytest.approx(0.001)
    assert spec.search.space["train.lr"].float_ == pytest.approx([1e-4, 1e-1])


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1e-3", 0.001), ("1E5", 1e5), ("-2e+2", -200.0), ("+1e0", 1.0), ("1.5e-3", 0.0015)],
)
def test_parse_yaml_reads_exponents_as_floats(text, expected):
    value = parse_yaml(f"x: {text}")["x"]
    assert isinstance(value, float)
    assert value == pytest.approx(expected)


@pytest.mark.parametrize("text", ["1e3x", "e5", "abc"])
def test_parse_yaml_leaves_other_strings_alone(text):
    assert parse_yaml(f"x: {text}")["x"] == text


# --- 4. --set overrides. ---
def test_set_applies_typed_values(cond_file):
    spec = load_spec(cond_file, ["train.lr=0.01", "train.epochs=3"])
    assert type(spec.train.lr) is float
    assert spec.train.lr == pytest.approx(0.01)
    assert type(spec.train.epochs) is int
    assert spec.train.epochs == 3


def test_set_exponent_value_is_float(cond_file):
    spec = load_spec(cond_file, ["reg.weight_decay=1e-4"])
    assert type(spec.reg.weight_decay) is float
    assert spec.reg.weight_decay == pytest.approx(1e-4)


def test_set_pins_a_searched_key(cond_file):
    assert "train.lr" in load_spec(cond_file).search.space
    spec = load_spec(cond_file, ["train.lr=0.01"])
    assert "train.lr" not in spec.search.space
    assert list(spec.search.space) == ["strategy.kind", "reg.dropout"]
    assert fixed_values(spec)["train.lr"] == pytest.approx(0.01)


def test_set_pinning_every_searched_key_leaves_an_empty_space(tmp_path):
    path = tmp_path / "one.yaml"
    path.write_text("name: one\nsearch:\n  space:\n    train.lr: {float: [1e-4, 1e-1]}\n")
    with pytest.raises(SpecError, match="search.space: empty"):
        load_spec(path, ["train.lr=0.01"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.lr=-1", "train.lr"),
        ("train.nope=1", "train.nope"),
        ("notakeyvalue", "notakeyvalue"),
        ("=3", "=3"),
        ("train.lr.x=1", "train.lr.x"),
        ("strategy.kind=lora", "strategy.kind"),
        ("search.space.train.lr=1", "search.space.train.lr"),
        ("train.epochs=[1", "train.epochs"),
    ],
)
def test_bad_set_raises_spec_error(cond_file, override, key):
    with pytest.raises(SpecError) as info:
        load_spec(cond_file, [override])
    msg = str(info.value)
    assert "--set" in msg
    assert key in msg


def test_bad_set_names_unknown_key(cond_file):
    with pytest.raises(SpecError, match="train.nope: unknown key") as info:
        load_spec(cond_file, ["train.nope=1"])
    assert str(cond_file) in str(info.value)


def test_conditional_param_without_set(cond_file):
    spec = load_spec(cond_file)
    dropout = spec.search.space["reg.dropout"]
    assert dropout.condition() == {"strategy.kind": ["full"]}
    assert active(dropout, {"strategy.kind": "full"})
    assert not active(dropout, {"strategy.kind": "linear_probe"})
    assert not active(dropout, {})


@pytest.mark.parametrize(("kind", "is_active"), [("full", True), ("linear_probe", False)])
def test_conditional_follows_pinned_key(cond_file, kind, is_active):
    spec = load_spec(cond_file, [f"strategy.kind={kind}"])
    assert "strategy.kind" not in spec.search.space
    assert "reg.dropout" in spec.search.space
    known = fixed_values(spec)
    assert known["strategy.kind"] == kind
    assert active(spec.search.space["reg.dropout"], known) is is_active


def test_set_does_not_change_the_file(cond_file):
    before = cond_file.read_text()
    load_spec(cond_file, ["train.lr=0.01"])
    assert cond_file.read_text() == before
    assert "train.lr" in load_spec(cond_file).search.space


# --- 5. trial_config and baseline_config. ---
def test_trial_config_applies_values_and_is_frozen(cond_file):
    spec = load_spec(cond_file)
    cfg = trial_config(spec, {"train.lr": 0.05, "strategy.kind": "linear_probe"})
    assert type(cfg) is TrialConfig
    assert not hasattr(cfg, "search")
    assert cfg.train.lr == pytest.approx(0.05)
    assert cfg.strategy.kind == "linear_probe"
    assert cfg.train.epochs == 2  # the file's own value
    with pytest.raises(ValidationError, match="frozen"):
        cfg.seed = 3
    with pytest.raises(ValidationError, match="frozen"):
        cfg.train.lr = 0.5
    assert cfg.train.lr == pytest.approx(0.05)
    # The spec itself is untouched.
    assert spec.train.lr == pytest.approx(0.001)
    assert spec.strategy.kind == "full"


def test_trial_config_rejects_bad_value(cond_file):
    spec = load_spec(cond_file)
    with pytest.raises(SpecError, match="train.lr"):
        trial_config(spec, {"train.lr": -1.0})
    with pytest.raises(SpecError, match="unknown key"):
        trial_config(spec, {"train.nope": 1})


def test_baseline_config_is_the_founding_recipe(tmp_path):
    tree = quickstart_tree()
    tree["train"].update(
        epochs=7, optimizer="adamw", lr=0.05, momentum=0.5, batch_size=16, schedule="cosine"
    )
    tree["strategy"]["kind"] = "linear_probe"
    tree["reg"].update(weight_decay=0.01, dropout=0.3)
    tree["aug"]["policy"] = "crop"
    spec = load_spec(write_tree(tmp_path, tree))
    cfg = baseline_config(spec)
    assert type(cfg) is TrialConfig
    assert cfg.train.optimizer == "sgd"
    assert cfg.train.lr == pytest.approx(0.001)
    assert cfg.train.momentum == pytest.approx(0.9)
    assert cfg.train.batch_size == 32
    assert cfg.train.schedule == "constant"
    assert cfg.strategy.kind == "full"
    assert cfg.reg.weight_decay == 0.0
    assert cfg.reg.dropout == 0.0
    assert cfg.aug.policy == "none"
    assert cfg.train.epochs == 7  # the file's own epoch budget
    assert cfg.name == "quickstart"


def test_baseline_config_of_quickstart():
    cfg = baseline_config(load_spec(QUICKSTART))
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.momentum) == ("sgd", 0.001, 0.9)
    assert (cfg.train.batch_size, cfg.strategy.kind) == (32, "full")
    assert (cfg.reg.weight_decay, cfg.reg.dropout) == (0.0, 0.0)
    assert cfg.train.epochs == quickstart_tree()["train"]["epochs"]


# --- 6. spec_hash. ---
def test_spec_hash_is_stable_across_loads():
    assert spec_hash(load_spec(QUICKSTART)) == spec_hash(load_spec(QUICKSTART))


def test_spec_hash_ignores_n_trials(tmp_path):
    tree = quickstart_tree()
    tree["search"]["n_trials"] = 500
    other = load_spec(write_tree(tmp_path, tree))
    assert other.search.n_trials == 500
    assert spec_hash(other) == spec_hash(load_spec(QUICKSTART))
    assert spec_hash(load_spec(QUICKSTART, ["search.n_trials=7"])) == spec_hash(
        load_spec(QUICKSTART)
    )


def test_spec_hash_changes_with_lr(tmp_path):
    tree = quickstart_tree()
    tree["train"]["lr"] = 0.002
    assert spec_hash(load_spec(write_tree(tmp_path, tree))) != spec_hash(load_spec(QUICKSTART))


def test_spec_hash_changes_with_search_space(tmp_path):
    tree = copy.deepcopy(quickstart_tree())
    tree["search"]["space"]["reg.dropout"] = {"float": [0.0, 0.4]}
    assert spec_hash(load_spec(write_tree(tmp_path, tree))) != spec_hash(load_spec(QUICKSTART))


# --- 7. The `check` command. ---


# --- The fine-tuning, regularization, model and data options. ---


def test_trial_config_is_frozen_all_the_way_down(cond_file):
    config = baseline_config(load_spec(cond_file))
    with pytest.raises(AttributeError):
        config.data.target_classes.append(9)
