"""Tests of the multi-task core (harness.core.multitask): task labels, uncertainty weighting, and
small multitask_fit runs on the digits (one task: exactly fit; three tasks). CPU only."""

from __future__ import annotations

import math

import pytest
import torch

from harness.config.spec import TrialConfig
from harness.core import finetune, models, shared
from harness.core import multitask as mt
from harness.data import datasets as hdata


def trial(weighting: str = "fixed", seed: int = 0, **train) -> TrialConfig:
    """The core reads train:, reg:, aug:, data.eval_train_max and multitask.weighting."""
    return TrialConfig.model_validate(
        {
            "name": "mt",
            "seed": seed,
            "model": {"pretrained": "none", "width": 8},
            "train": {"epochs": 3, "device": "cpu", "lr": 0.05, **train},
            "data": {"target_classes": list(range(10)), "shots_per_class": 30},
            "multitask": {"weighting": weighting},
        }
    )


@pytest.fixture(scope="module")
def digits() -> hdata.TaskData:
    return hdata.load_target(trial().data, seed=0)


def fresh(config: TrialConfig, classes: int = 10) -> models.ImageModel:
    shared.seed_everything(config.seed)
    return models.build_model(config.model, classes)


def test_task_labels_from_lookup_function_and_per_image():
    y = torch.tensor([0, 3, 4, 5, 9])
    digit, parity, gt4 = mt.digit_tasks()
    assert torch.equal(digit.targets(y, "train"), y)
    assert parity.targets(y, "train").tolist() == [0, 1, 0, 1, 1]
    assert gt4.targets(y, "val").tolist() == [0, 0, 0, 1, 1]
    by_fn = mt.Task("parity", 2, lambda labels: labels % 2)
    assert torch.equal(by_fn.targets(y, "train"), parity.targets(y, "train"))
    per_image = mt.Task("odd", 2, {"train": torch.tensor([1, 1, 0, 0, 1])})
    assert per_image.targets(y, "train").tolist() == [1, 1, 0, 0, 1]
    with pytest.raises(ValueError, match="split 'val'"):
        per_image.targets(y, "val")
    with pytest.raises(ValueError, match="outside 0..1"):
        mt.Task("bad", 2, lambda labels: labels).targets(y, "train")
    # class ids, not label positions: target classes 5..9 relabelled 0..4
    assert mt.digit_tasks((5, 6, 7, 8, 9))[1].targets(torch.arange(5), "x").tolist() == [
        1,
        0,
        1,
        0,
        1,
    ]


def test_uncertainty_weights_move_to_the_log_of_each_loss():
    losses = torch.tensor([4.0, 0.25, 1.0])
    log_vars = torch.zeros(3, requires_grad=True)
    assert mt.uncertainty_loss(losses, log_vars).item() == pytest.approx(5.25)
    optimizer = torch.optim.Adam([log_vars], lr=0.05)
    for _ in range(400):
        optimizer.zero_grad()
        mt.uncertainty_loss(losses, log_vars).backward()
        optimizer.step()
    torch.testing.assert_close(log_vars.detach(), losses.log(), atol=0.02, rtol=0)


def test_one_task_is_exactly_fit(digits):
    config = trial()
    expected = finetune.fit(config, fresh(config), digits)
    model = fresh(config)
    result = mt.multitask_fit(
        config,
        model,
        [mt.Task("digit", 10)],
        digits,
    )
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "train_loss_running"):
        assert [m[key] for m in result.history] == [m[key] for m in expected.history], key
    assert all(torch.equal(v, expected.best_state[k]) for k, v in result.best_state.items())


class Recorder:
    def __init__(self):
        self.calls = []

    def on_epoch_end(self, epoch, metrics):
        self.calls.append((epoch, dict(metrics)))


@pytest.mark.parametrize("weighting", ["fixed", "uncertainty"])
def test_three_tasks(digits, weighting):
    config = trial(weighting, seed=1, epochs=4)
    tasks = mt.digit_tasks(digits.classes)
    runs = []
    for _ in range(2):
        model, rec = fresh(trial()), Recorder()
        runs.append((mt.multitask_fit(config, model, tasks, digits, [rec]), rec, model))
    (a, rec, model), (b, _, _) = runs
    assert a.history == b.history == [m for _, m in rec.calls]  # deterministic
    for _, m in rec.calls:
        for t in ("digit", "parity", "gt4"):
            for key in ("train_acc", "val_acc", "overfit_gap", "train_loss", "val_loss", "weight"):
                assert f"{t}_{key}" in m
            assert m[f"{t}_overfit_gap"] == pytest.approx(m[f"{t}_train_acc"] - m[f"{t}_val_acc"])
            assert (f"{t}_log_var" in m) == (weighting == "uncertainty")
        assert m["val_acc"] == m["digit_val_acc"] and m["train_acc"] == m["digit_train_acc"]
    assert a.best["val_acc"] == max(m["val_acc"] for m in a.history)
    # the model and heads hold the best epoch's weights: their val accuracy is the best's
    logits = mt.predict(model, a.heads, digits.x_val, "digit")
    parity = tasks[1].targets(digits.y_val, "val")
    acc = (logits["parity"].argmax(1) == parity).float().mean().item()
    assert acc == pytest.approx(a.best["parity_val_acc"])
    assert max(m["parity_val_acc"] for m in a.history) > 0.7  # chance is about 0.5
    if weighting == "uncertainty":
        last = a.history[-1]
        assert all(last[f"{t}_log_var"] != 0 for t in ("digit", "parity", "gt4"))
        # toward each task's loss scale: 10-way digit keeps a larger loss than parity
        assert last["digit_train_loss"] > last["parity_train_loss"]
        assert last["digit_log_var"] > 0 > last["parity_log_var"]
        assert last["digit_weight"] == pytest.approx(math.exp(-last["digit_log_var"]), rel=1e-6)
    else:
        assert all(m["parity_weight"] == 1.0 for m in a.history)


def test_uncertainty_gives_a_noisy_task_a_larger_log_variance(digits):
    """A task of random labels keeps a high loss: its log-variance rises above the easy
    parity task's, so its weight exp(-s) falls below parity's."""
    g = torch.Generator().manual_seed(0)
    noise = {"train": torch.randint(0, 10, (len(digits.y_train),), generator=g)}
    noise["val"] = torch.randint(0, 10, (len(digits.y_val),), generator=g)
    tasks = [mt.digit_tasks()[1], mt.Task("noise", 10, noise)]
    config = trial("uncertainty", epochs=6)
    shared.seed_everything(0)
    model = models.build_model(trial().model, 2)
    result = mt.multitask_fit(config, model, tasks, digits)
    last = result.history[-1]
    assert last["noise_train_loss"] > last["parity_train_loss"]
    assert last["noise_log_var"] > last["parity_log_var"]
    assert last["noise_weight"] < last["parity_weight"]


def test_target_head_must_fit(digits):
    with pytest.raises(ValueError, match="head has 5 outputs"):
        mt.multitask_fit(
            trial(),
            fresh(trial(), 5),
            mt.digit_tasks(),
            digits,
        )


def test_weight_decay_skips_every_norm_and_bias_as_fit_does():
    """One rule (shared.split_decay) for both cores: GroupNorm and RMSNorm too, which the
    multi-task core once decayed."""
    from torch import nn

    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.LayerNorm(4), nn.RMSNorm(4), nn.Linear(4, 2)
    )
    heads = mt.MultiTaskHeads(4, [mt.Task("aux", 2)], 0.0, learned=True)
    config = trial()
    config = config.model_copy(update={"reg": config.reg.model_copy(update={"weight_decay": 0.1})})
    opt = mt._optimizer(config, net, heads, torch.device("cpu"))
    decay, rest = ({id(p) for p in g["params"]} for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    weights = {id(net[0].weight), id(net[4].weight), id(heads.heads["aux"][1].weight)}
    assert decay == weights
    norms = {id(p) for m in net[1:4] for p in m.parameters()}
    biases = {id(net[0].bias), id(net[4].bias), id(heads.heads["aux"][1].bias)}
    assert rest == norms | biases | {id(heads.log_vars)}
    fit_decay, fit_rest = shared.split_decay([*net.modules(), *heads.heads.modules()])
    assert {id(p) for p in fit_decay} == decay
