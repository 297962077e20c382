"""Tests of SWA inside a trial (`reg.swa_start`, `reg.swa_lr`; `regularizers.Swa` on
torch.optim.swa_utils): the averaged weights are the mean of the SWA epochs' weights, BatchNorm
statistics are recomputed by update_bn on the train split, the metrics and the kept weights are
the average's, the lr follows SWALR, a resumed fit equals the uninterrupted one bit for bit, and
the config refuses what SWA cannot do. Tiny fits of small_cnn on the real digits data."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_config as base_config
from test_resume import Checkpoints, Stop, fresh_model, plain_tree, same_tree, snapshot
from test_spec import QUICKSTART, REPO, quickstart_tree, write_tree
from torch import nn
from torch.optim.swa_utils import SWALR, update_bn

from harness.config.load import load_spec
from harness.config.spec import BASELINE, RegSpec, SpecError, TrialConfig, baseline_config
from harness.config.spec import trial_config as make_trial_config
from harness.core import finetune, resume_state, shared
from harness.core.resume_state import load_state_file
from harness.data import datasets as hdata


def make_config(**sections: dict) -> TrialConfig:
    """CPU, 4 epochs, cosine, lr 0.05, width 16, SWA from epoch 3 to swa_lr 0.01."""
    defaults = {
        "train": {"epochs": 4, "schedule": "cosine"},
        "model": {"width": 16},
        "reg": {"swa_start": 0.5, "swa_lr": 0.01},
    }
    return base_config(defaults, **sections)


@pytest.fixture(scope="module")
def task() -> hdata.TaskData:
    return hdata.load_target(make_config().data, 0)


def params(model: nn.Module) -> list[str]:
    return [k for k, _ in model.named_parameters()]


def swa_module(state: dict) -> dict[str, torch.Tensor]:
    """The averaged model's weights (the AveragedModel's `module.` keys) of a resume state."""
    model = state["swa"]["model"]
    return {k.removeprefix("module."): v for k, v in model.items() if k.startswith("module.")}


def bn_reference(config: TrialConfig, weights: dict, x: torch.Tensor) -> nn.Module:
    """A model with `weights`, its BatchNorm statistics recomputed by torch's update_bn on the
    train split in order, in the fit's batches."""
    model = fresh_model(config)
    model.load_state_dict(weights)
    bs = config.train.batch_size
    update_bn([x[i : i + bs] for i in range(0, len(x), bs)], model)
    return model


# --- the rule and the config -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("start", "epochs", "first"),
    [(0.0, 4, None), (0.5, 4, 3), (0.25, 4, 2), (0.3, 10, 4), (0.01, 10, 2), (0.9, 10, 10)],
)
def test_first_epoch_is_ceil_of_start_times_epochs_plus_one(start, epochs, first):
    assert RegSpec(swa_start=start).swa_first_epoch(epochs) == first


@pytest.mark.parametrize("value", ["1.0", "1.5", "-0.1"])
def test_bad_swa_start_fails_validation_naming_the_key(tmp_path, value):
    with pytest.raises(SpecError, match=r"reg\.swa_start"):
        load_spec(QUICKSTART, [f"reg.swa_start={value}"])
    tree = quickstart_tree()
    tree["reg"] = {**tree.get("reg", {}), "swa_start": float(value)}
    path = write_tree(tmp_path, tree)
    with pytest.raises(SpecError, match=r"reg\.swa_start") as info:
        load_spec(path)
    assert str(path) in str(info.value)


def test_bad_swa_start_exits_2_in_the_cli(tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, str(REPO / "run_study.py"), "check", str(QUICKSTART)]
        + ["--set", "reg.swa_start=1.5"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "reg.swa_start" in done.stderr + done.stdout


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["reg.swa_lr=-0.1"], r"reg\.swa_lr"),
        (["reg.swa_start=0.5", "reg.ema_decay=0.9"], r"reg\.swa_start and reg\.ema_decay"),
        (["train.epochs=4", "reg.swa_start=0.8"], r"reg\.swa_start: 0\.8 .* epoch 5, after"),
        (
            ["train.epochs=10", "strategy.kind=lp_ft", "strategy.lp_epochs=4", "reg.swa_start=0.3"],
            r"reg\.swa_start: 0\.3 averages from epoch 4, within LP-FT",
        ),
    ],
)
def test_config_refuses_what_swa_cannot_do(overrides, message):
    with pytest.raises(SpecError, match=message):
        load_spec(QUICKSTART, overrides)


@pytest.mark.parametrize(
    ("experiment", "message"),
    [("digits_meta.yaml", "meta-learning"), ("digits_multitask.yaml", "multi-task")],
)
def test_meta_and_multitask_refuse_swa(experiment, message):
    with pytest.raises(SpecError, match=rf"reg\.swa_start.*{message}"):
        load_spec(REPO / "experiments" / experiment, ["reg.swa_start=0.5"])


def test_swa_is_searchable_and_off_in_the_baseline(tmp_path):
    tree = quickstart_tree()
    tree["reg"] = {**tree.get("reg", {}), "swa_start": 0.5, "swa_lr": 0.01}
    tree["search"]["space"]["reg.swa_start"] = {"float": [0.25, 0.75]}
    spec = load_spec(write_tree(tmp_path, tree))
    config = make_trial_config(spec, {"reg.swa_start": 0.4})
    assert (config.reg.swa_start, config.reg.swa_lr) == (0.4, 0.01)
    base = baseline_config(spec)
    assert (base.reg.swa_start, base.reg.swa_lr) == (0.0, 0.0)
    assert BASELINE["reg.swa_start"] == 0.0
    assert TrialConfig(name="t").reg.swa_start == 0.0  # off by default


def test_the_regularization_study_searches_swa():
    spec = load_spec(REPO / "experiments" / "digits_regularization.yaml")
    assert spec.search.space["reg.swa_start"].condition() == {"reg.ema_decay": [0.0]}


# --- the average, BatchNorm, the metrics, the lr -------------------------------------------------
def test_average_is_the_mean_of_the_swa_epochs_with_bn_recomputed(task):
    config = make_config(train={"epochs": 5}, reg={"swa_start": 0.4})  # SWA epochs 3, 4, 5
    model = fresh_model(config)
    cb = Checkpoints(model)
    result = finetune.fit(config, model, task, callbacks=[cb])
    names = params(model)
    for end in (3, 4, 5):
        state = cb.states[end]
        assert int(state["swa"]["model"]["n_averaged"]) == end - 2
        averaged = swa_module(state)
        for k in names:  # the equal mean of the raw weights at the ends of epochs 3..end
            mean = torch.stack([cb.weights[e][k] for e in range(3, end + 1)]).mean(0)
            assert torch.allclose(averaged[k], mean, atol=1e-6), (end, k)
        # BatchNorm: recomputed on the train split, not the mean of the epochs' statistics
        reference = bn_reference(config, averaged, task.x_train).state_dict()
        bns = [k for k in averaged if k.endswith("running_mean") or k.endswith("running_var")]
        assert bns
        for k in bns:
            mean = torch.stack([cb.weights[e][k] for e in range(3, end + 1)]).mean(0)
            assert not torch.allclose(averaged[k], mean, atol=1e-4), (end, k)
            assert not torch.allclose(averaged[k], cb.weights[end][k], atol=1e-4), (end, k)
            assert torch.equal(averaged[k], reference[k]), (end, k)  # the same float ops
        # the epoch's metrics are the average's
        probe = fresh_model(config)
        probe.load_state_dict(averaged)
        va_loss, va_correct = finetune.evaluate(probe, task.x_val, task.y_val)
        m, n = result.history[end - 1], len(task.x_val)
        assert m["val_acc"] == pytest.approx(va_correct.item() / n, abs=1e-9)
        assert m["val_loss"] == pytest.approx(va_loss.item() / n, abs=1e-5)
    # before SWA, the raw weights are measured and nothing is averaged
    assert cb.states[2]["swa"]["scheduler"] is None
    assert int(cb.states[2]["swa"]["model"]["n_averaged"]) == 0
    # the kept best epoch: the average of that epoch when it is an SWA epoch
    kept = cb.states[5]["best_state"]
    if result.best_epoch >= 3:
        same_tree(kept, swa_module(cb.states[result.best_epoch]))
    same_tree(snapshot(model), result.best_state)


def test_raw_weights_differ_from_the_measured_average(task):
    config = make_config()
    model = fresh_model(config)
    cb = Checkpoints(model)
    finetune.fit(config, model, task, callbacks=[cb])
    names = params(model)
    averaged = swa_module(cb.states[4])
    assert any(not torch.equal(averaged[k], cb.weights[4][k]) for k in names)


def _reference_lrs(config: TrialConfig, n_train: int, base_lrs: list[float]) -> list[list[float]]:
    """Each epoch's starting lrs of groups with `base_lrs`: the cosine schedule, then SWALR
    (from the schedule's lrs at the start to swa_lr x base / train.lr, over one epoch's steps)."""
    spe = shared.steps_per_epoch(n_train, config.train.batch_size)
    total, epochs = config.train.epochs * spe, config.train.epochs
    first = config.reg.swa_first_epoch(epochs)
    dummy = [nn.Parameter(torch.zeros(1)) for _ in base_lrs]
    factor = shared.lr_factor("cosine", (first - 1) * spe, total)
    groups = [{"params": [p], "lr": b * factor} for p, b in zip(dummy, base_lrs, strict=True)]
    optimizer = torch.optim.SGD(groups, lr=1.0)
    if config.reg.swa_lr == 0:
        targets = [b * factor for b in base_lrs]
    else:
        targets = [config.reg.swa_lr * b / config.train.lr for b in base_lrs]
    swalr = SWALR(optimizer, targets, anneal_epochs=spe, anneal_strategy="cos")
    out = []
    for epoch in range(1, epochs + 1):
        if epoch < first:
            f = shared.lr_factor("cosine", (epoch - 1) * spe, total)
            out.append([b * f for b in base_lrs])
            continue
        out.append([g["lr"] for g in optimizer.param_groups])
        for _ in range(spe):
            optimizer.step()
            swalr.step()
    return out


@pytest.mark.parametrize("swa_lr", [0.01, 0.0])
def test_lr_follows_swalr(task, swa_lr):
    config = make_config(
        strategy={"head_lr_mult": 2.0, "layer_decay": 0.5},
        reg={"swa_start": 0.25, "swa_lr": swa_lr},
    )
    model = fresh_model(config)
    cb = Checkpoints(model)
    result = finetune.fit(config, model, task, callbacks=[cb])
    base = [g["lr"] for g in result.param_groups[0]]  # epoch 1 of a cosine: the base lrs
    assert len(set(base)) > 2  # head x 2, stages x 0.5^depth
    expected = _reference_lrs(config, len(task.x_train), base)
    got = [[g["lr"] for g in groups] for groups in result.param_groups]
    assert got == expected  # exactly: the same arithmetic
    assert [m["lr"] for m in result.history] == [lrs[0] for lrs in expected]  # the head's
    # SWALR's anneal is over after the first SWA epoch: every group at its SWA lr to the end
    final = cb.states[4]["optimizer"]["param_groups"]
    assert [g["lr"] for g in final] == [g["swa_lr"] for g in final] == expected[-1]
    if swa_lr > 0:
        assert expected[-1][0] == pytest.approx(2.0 * swa_lr)  # the head keeps its factor
        assert expected[1][0] != pytest.approx(2.0 * swa_lr)  # epoch 2 starts the anneal
    else:  # constant from the start: the lr the schedule had then
        assert all(e == pytest.approx(expected[1]) for e in expected[1:])


# --- resume --------------------------------------------------------------------------------------
CASES = {
    "cosine_head_mult_stop_in_swa": (
        {"strategy": {"head_lr_mult": 2.0}, "reg": {"swa_start": 0.25}, "aug": {"policy": "crop"}},
        (2, 3),
    ),
    "gradual_unfreeze_adamw_schedule_lr_mixup": (
        {
            "train": {"optimizer": "adamw", "lr": 0.01},
            "strategy": {"kind": "gradual_unfreeze", "unfreeze_every": 1},
            "reg": {"swa_start": 0.25, "swa_lr": 0.0, "mixup_alpha": 0.4, "dropout": 0.2},
        },
        (2, 3),
    ),
    "lp_ft_stop_before_swa": (
        {
            "train": {"lr": 0.1},
            "strategy": {"kind": "lp_ft", "lp_epochs": 1, "ft_lr_scale": 0.5},
            "reg": {"swa_start": 0.5, "swa_lr": 0.02},
        },
        (2, 3),
    ),
}


@pytest.mark.parametrize(
    ("case", "stop"), [(c, s) for c in sorted(CASES) for s in CASES[c][1]], ids=str
)
def test_resume_equals_uninterrupted(task, tmp_path, case, stop):
    config = make_config(**CASES[case][0])
    model = fresh_model(config)
    straight_cb = Checkpoints(model)
    straight = finetune.fit(config, model, task, callbacks=[straight_cb])

    path = tmp_path / "state.pt"
    interrupted = fresh_model(config)
    with pytest.raises(Stop, match=f"after epoch {stop}"):
        finetune.fit(config, interrupted, task, callbacks=[Checkpoints(interrupted, path, stop)])
    state = load_state_file(path)
    assert state.keys() == set(resume_state.KEYS)
    plain_tree(state)
    first = config.reg.swa_first_epoch(config.train.epochs)
    assert int(state["swa"]["model"]["n_averaged"]) == max(0, stop - first + 1)
    assert (state["swa"]["scheduler"] is None) == (stop < first)

    model = fresh_model(config)
    resumed_cb = Checkpoints(model)
    resumed = finetune.fit(config, model, task, callbacks=[resumed_cb], resume=state)
    assert resumed_cb.epochs == list(range(stop + 1, 5))
    assert resumed.history == straight.history
    assert resumed.best_epoch == straight.best_epoch and resumed.best == straight.best
    assert resumed.param_groups == straight.param_groups
    same_tree(resumed.best_state, straight.best_state)
    same_tree(snapshot(model), straight.best_state)
    same_tree(resumed_cb.weights[4], straight_cb.weights[4])
    ends = [cb.states[4] | {"seconds": 0.0} for cb in (straight_cb, resumed_cb)]
    same_tree(*ends)  # the average, SWALR, the optimizer, the RNGs, ...


def test_a_state_saved_before_swa_existed_resumes(task):
    config = make_config(reg={"swa_start": 0.0, "swa_lr": 0.0})
    model = fresh_model(config)
    straight_cb = Checkpoints(model)
    straight = finetune.fit(config, model, task, callbacks=[straight_cb])
    assert straight_cb.states[2]["swa"] is None
    old = {k: v for k, v in straight_cb.states[2].items() if k != "swa"}
    resumed = finetune.fit(config, fresh_model(config), task, resume=old)
    assert resumed.history == straight.history
    same_tree(resumed.best_state, straight.best_state)


def test_swa_adds_no_per_batch_host_sync(task, host_reads):
    def syncs(batch_size: int) -> int:
        config = make_config(
            train={"epochs": 3, "batch_size": batch_size},
            strategy={"kind": "gradual_unfreeze"},
            reg={"swa_start": 0.3},
        )
        model = fresh_model(config)
        return host_reads(lambda: finetune.fit(config, model, task))

    assert syncs(50) == syncs(10)


def test_swa_fit_repeats_bit_for_bit(task):
    config = make_config()
    a = finetune.fit(config, fresh_model(config), task)
    b = finetune.fit(config, fresh_model(config), task)
    assert a.history == b.history
    same_tree(a.best_state, b.best_state)
    assert all(math.isfinite(m["val_loss"]) for m in a.history)


def test_two_ranks_with_swa_equal_one_device():
    """K=2 gloo ranks, `bn: sync`: each rank's update_bn pass takes its slice of every batch, the
    synced BatchNorm sums them: one device's statistics, within test_distributed's tolerance."""
    from test_distributed import ABS_TOL, REL_TOL, _config, _fit, _no_ranks_left

    def config(k: int) -> TrialConfig:
        c = _config(k, bn="sync", epochs=3, lr=0.01)
        return c.model_copy(update={"reg": RegSpec(swa_start=0.3, swa_lr=0.005)})

    one, two = _fit(config(1)), _fit(config(2))
    assert [m["lr"] for m in one.history] == [m["lr"] for m in two.history]
    assert one.history[-1]["lr"] == 0.005  # SWA from epoch 2: SWALR's lr after its anneal
    for m1, m2 in zip(one.history, two.history, strict=True):
        for key in ("train_loss", "val_loss", "train_loss_running"):
            assert math.isclose(m1[key], m2[key], rel_tol=REL_TOL, abs_tol=ABS_TOL), key
    assert _no_ranks_left()
