"""Tests of the resume state: an interrupted fit resumed from its saved state equals the
uninterrupted fit bit for bit on the CPU, for every kind of state fit keeps (schedule, phases,
added optimizer groups, EMA, RNGs, L2-SP anchors); the state is written atomically and loaded
without running code. Tiny fits of small_cnn on the real digits data."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from conftest import make_config as base_config
from torch import nn

from harness.config.spec import TrialConfig
from harness.core import finetune, models, resume_state, shared
from harness.core.resume_state import load_state_file, save_state
from harness.data import datasets as hdata


def make_config(**sections: dict) -> TrialConfig:
    """A strict TrialConfig: CPU, 4 epochs, lr 0.05, width 16, with `sections` merged in."""
    return base_config({"train": {"epochs": 4}, "model": {"width": 16}}, **sections)


def fresh_model(config: TrialConfig) -> nn.Module:
    shared.seed_everything(config.seed)
    return models.build_model(config.model, 5, config.reg.dropout)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def same_tree(a, b, path: str = "state") -> None:
    """Assert that two states are equal: tensors bit for bit, everything else with ==."""
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            same_tree(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same_tree(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def plain_tree(obj, path: str = "state") -> None:
    """Only CPU tensors, plain dicts, lists, tuples, numbers, strings and None."""
    if isinstance(obj, torch.Tensor):
        assert obj.device.type == "cpu", path
    elif isinstance(obj, dict):
        assert type(obj) is dict, path
        for k, v in obj.items():
            assert isinstance(k, str | int), path
            plain_tree(v, f"{path}.{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            plain_tree(v, f"{path}[{i}]")
    else:
        assert obj is None or type(obj) in (bool, int, float, str), (path, type(obj))


class Stop(Exception):
    pass


class Checkpoints:
    """Keeps every state offered; with `save_to`, also writes the epoch-`stop` state there
    with save_state and then raises (an interrupted trial). Snapshots the raw weights."""

    def __init__(self, model: nn.Module, save_to: Path | None = None, stop: int = 0):
        self.model, self.save_to, self.stop = model, save_to, stop
        self.epochs: list[int] = []
        self.states: dict[int, dict] = {}
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.epochs.append(epoch)
        self.weights[epoch] = snapshot(self.model)

    def on_checkpoint(self, epoch: int, state: dict) -> None:
        self.states[epoch] = state
        if self.save_to is not None and epoch == self.stop:
            save_state(state, self.save_to)
            raise Stop(f"interrupted after epoch {epoch}")


@pytest.fixture(scope="module")
def task() -> hdata.TaskData:
    return hdata.load_target(make_config().data, 0)


CASES = {
    "full_sgd_cosine_crop_dropout": {
        "train": {"schedule": "cosine"},
        "aug": {"policy": "crop"},
        "reg": {"dropout": 0.3, "weight_decay": 0.001},
    },
    "lp_ft_switch_after_resume": {
        "train": {"schedule": "cosine", "lr": 0.1},
        "strategy": {"kind": "lp_ft", "lp_epochs": 3, "ft_lr_scale": 0.5},
    },
    "lp_ft_switch_before_resume": {
        "train": {"schedule": "cosine", "lr": 0.1},
        "strategy": {"kind": "lp_ft", "lp_epochs": 1, "ft_lr_scale": 0.5},
        "aug": {"policy": "crop"},
    },
    "gradual_unfreeze_adamw": {
        "train": {"optimizer": "adamw", "lr": 0.01, "schedule": "cosine"},
        "strategy": {"kind": "gradual_unfreeze", "unfreeze_every": 1},
        "reg": {"weight_decay": 0.01},
    },
    "ema_mix_smoothing_layer_decay_l2sp": {
        "strategy": {"layer_decay": 0.7, "head_lr_mult": 2.0},
        "reg": {
            "ema_decay": 0.8,
            "mixup_alpha": 0.4,
            "cutmix_alpha": 0.4,
            "label_smoothing": 0.1,
            "l2_sp": 0.01,
            "l2_sp_head": 0.001,
            "dropout": 0.2,
        },
        "aug": {"policy": "crop"},
    },
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_equals_uninterrupted(task, tmp_path, case):
    config = make_config(**CASES[case])
    model = fresh_model(config)
    straight_cb = Checkpoints(model)
    straight = finetune.fit(config, model, task, callbacks=[straight_cb])
    assert straight_cb.epochs == [1, 2, 3, 4] and sorted(straight_cb.states) == [1, 2, 3, 4]

    path = tmp_path / "state.pt"
    interrupted = fresh_model(config)
    with pytest.raises(Stop, match="after epoch 2"):
        finetune.fit(config, interrupted, task, callbacks=[Checkpoints(interrupted, path, 2)])
    state = load_state_file(path)
    assert state["epoch"] == 2 and len(state["history"]) == 2
    assert state.keys() == set(resume_state.KEYS)
    plain_tree(state)

    model = fresh_model(config)  # built as the first time
    resumed_cb = Checkpoints(model)
    resumed = finetune.fit(config, model, task, callbacks=[resumed_cb], resume=state)
    assert resumed_cb.epochs == [3, 4]  # callbacks only for the new epochs
    assert resumed.history == straight.history  # every metric of every epoch, exactly
    assert resumed.best_epoch == straight.best_epoch and resumed.best == straight.best
    assert resumed.param_groups == straight.param_groups
    same_tree(resumed.best_state, straight.best_state)
    same_tree(snapshot(model), straight.best_state)  # fit ends with the best weights loaded
    same_tree(resumed_cb.weights[4], straight_cb.weights[4])  # the last raw weights
    # the whole state after the last epoch agrees too: optimizer, EMA, generators, ...
    ends = [cb.states[4] | {"seconds": 0.0} for cb in (straight_cb, resumed_cb)]
    same_tree(*ends)
    assert resumed_cb.states[4]["seconds"] >= state["seconds"]
    if "lp_ft" in case:
        assert [m["phase"] for m in resumed.history] == [
            float(e > config.strategy.lp_epochs) for e in (1, 2, 3, 4)
        ]
    if "gradual" in case:  # the resumed optimizer grew its groups at epochs 3 and 4
        assert [len(g) for g in resumed.param_groups] == [2, 4, 6, 8]


def test_resume_does_not_change_the_saved_state(task):
    config = make_config(**CASES["gradual_unfreeze_adamw"])
    model = fresh_model(config)
    cb = Checkpoints(model)
    finetune.fit(config, model, task, callbacks=[cb])
    state = cb.states[2]
    before = resume_state.cpu_tree(state)  # a deep copy
    finetune.fit(config, fresh_model(config), task, resume=state)
    same_tree(state, before)


def test_offering_the_state_changes_nothing(task, monkeypatch):
    config = make_config(**CASES["ema_mix_smoothing_layer_decay_l2sp"])
    model = fresh_model(config)
    offered = finetune.fit(config, model, task, callbacks=[Checkpoints(model)])

    def refuse(*args, **kwargs):
        raise AssertionError("a state was built though no callback has on_checkpoint")

    monkeypatch.setattr(resume_state, "capture", refuse)
    plain = finetune.fit(config, fresh_model(config), task)
    assert plain.history == offered.history
    same_tree(plain.best_state, offered.best_state)


def test_no_checkpoint_for_an_epoch_whose_callback_raised(task):
    class PruneAt2(Checkpoints):
        def on_epoch_end(self, epoch, metrics):
            super().on_epoch_end(epoch, metrics)
            if epoch == 2:
                raise Stop("pruned")

    config = make_config(train={"epochs": 3})
    model = fresh_model(config)
    cb = PruneAt2(model)
    with pytest.raises(Stop, match="pruned"):
        finetune.fit(config, model, task, callbacks=[cb])
    assert cb.epochs == [1, 2] and sorted(cb.states) == [1]


def test_resume_refuses_another_config(task):
    config = make_config(train={"epochs": 2})
    model = fresh_model(config)
    cb = Checkpoints(model)
    finetune.fit(config, model, task, callbacks=[cb])
    other = make_config(train={"epochs": 2, "lr": 0.1})
    with pytest.raises(ValueError, match=r"train\.lr"):
        finetune.fit(other, fresh_model(other), task, resume=cb.states[1])
    with pytest.raises(ValueError, match="version"):
        finetune.fit(config, fresh_model(config), task, resume={"epoch": 1})
    # device and threads may change between a run and its resume
    moved = make_config(train={"epochs": 2, "threads": torch.get_num_threads()})
    done = finetune.fit(moved, fresh_model(moved), task, resume=cb.states[2])
    assert done.history == cb.states[2]["history"]  # nothing left to train


def test_resume_accepts_a_state_saved_before_a_config_key_was_added(task):
    """A state saved by an older harness lacks the keys added since; at their defaults they
    are no change. The same key away from its default is one."""
    import json

    config = make_config(train={"epochs": 2})
    model = fresh_model(config)
    cb = Checkpoints(model)
    finetune.fit(config, model, task, callbacks=[cb])
    old = dict(cb.states[2])
    tree = json.loads(old["config"])
    del tree["train"]["amp"], tree["multitask"]  # as saved before those keys existed
    old["config"] = json.dumps(tree, sort_keys=True)
    done = finetune.fit(config, fresh_model(config), task, resume=old)
    assert done.history == cb.states[2]["history"]
    changed = make_config(train={"epochs": 2, "amp": False})
    with pytest.raises(ValueError, match=r"train\.amp"):
        finetune.fit(changed, fresh_model(changed), task, resume=old)


# --- writing and loading ---------------------------------------------------------------------
def test_crash_while_writing_keeps_the_previous_state(task, tmp_path, monkeypatch):
    config = make_config(train={"epochs": 2})
    model = fresh_model(config)
    cb = Checkpoints(model)
    finetune.fit(config, model, task, callbacks=[cb])
    path = tmp_path / "trial" / "state.pt"
    path.parent.mkdir()
    save_state(cb.states[1], path)
    real_save = torch.save

    def crash(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")  # part of the file is written, then the disk fails
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="No space left"):
        save_state(cb.states[2], path)
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in path.parent.iterdir()] == ["state.pt"]  # no temporary left
    same_tree(load_state_file(path), cb.states[1])
    save_state(cb.states[2], path)  # the next write goes through
    same_tree(load_state_file(path), cb.states[2])
    assert [p.name for p in path.parent.iterdir()] == ["state.pt"]


def _plant(marker: str) -> dict:
    Path(marker).write_text("code ran")
    return {}


class Malicious:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_plant, (self.marker,))


@pytest.mark.parametrize("how", ["torch_save", "raw_pickle"])
def test_loading_refuses_code(tmp_path, how):
    marker, path = tmp_path / "marker", tmp_path / "state.pt"
    payload = {"version": resume_state.VERSION, "epoch": 1, "model": Malicious(marker)}
    if how == "torch_save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(pickle.UnpicklingError):
        load_state_file(path)
    assert not marker.exists()
    # such a payload is real: an unrestricted load runs it
    control = tmp_path / "control"
    torch.save({"model": Malicious(control)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.read_text() == "code ran"
