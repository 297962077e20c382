"""Tests of the fine-tuning strategies in the core: what freezes, when, the optimizer's named
param groups and their learning rates and weight decay, BatchNorm modes, and a golden history
of the baseline recipe. Tiny fits of small_cnn (3 stages) on the real digits data, on the CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import fresh_model, make_config
from recorded import THREADS, assert_history_matches_recorded, assert_matches_recorded
from torch import nn

from harness.config.spec import StrategySpec
from harness.core import finetune, models, strategies


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], suffix: str) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a if k.endswith(suffix))


class StageRecorder:
    """Snapshots every stage after each epoch, and which stages required grad in it."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.stages: dict[int, list[dict[str, torch.Tensor]]] = {}
        self.grad: dict[int, list[bool]] = {}

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.stages[epoch] = [snapshot(s) for s in models.stages(self.model)]
        self.grad[epoch] = [
            any(p.requires_grad for p in s.parameters()) for s in models.stages(self.model)
        ]


# --- golden: the baseline recipe's history is what it was before the strategies -------------
def _init_summary(model: nn.Module) -> dict[str, float]:
    """Each weight's sum of |w| and of w^2 (and the head's bias): a fingerprint of the init that
    another kernel path reproduces within the golden tolerance (the init's last bits differ
    under ATEN_CPU_CAPABILITY=default, so a hash of its bytes would not)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("weight") or k == "net.head.1.bias":
            out[f"{k}:abs"] = float(v.detach().double().abs().sum())
            out[f"{k}:sq"] = float(v.detach().double().square().sum())
    return out


# fmt: off
GOLDEN_INIT = {  # _init_summary of the seed-0 small_cnn, as the goldens below started from
    "net.stages.0.0.0.weight": (47.56093341129599, 10.514821921094015), "net.stages.0.0.1.weight": (32.0, 32.0),  # noqa: E501
    "net.stages.0.1.0.weight": (269.91995777081866, 10.601252296677208), "net.stages.0.1.1.weight": (32.0, 32.0),  # noqa: E501
    "net.stages.1.1.0.weight": (542.1477805343739, 21.284112751177524), "net.stages.1.1.1.weight": (64.0, 64.0),  # noqa: E501
    "net.stages.2.1.0.weight": (764.1075079926492, 21.178379105323078), "net.stages.2.1.1.weight": (64.0, 64.0),  # noqa: E501
    "net.head.1.weight": (20.647576212882996, 1.7500792687608784), "net.head.1.bias": (0.32432909309864044, 0.03233251057815001),  # noqa: E501
}
# fmt: on
GOLDEN_DATA = "e69c5aec2dc154f1"
# Captured with the core before strategies and regularizers (commit 7d3462a), threads=1, on one
# machine: compared through tests/recorded.py, within its stated tolerance, on any other.
# fmt: off
GOLDEN = {
    "full_sgd_cosine_crop": (
        {"train": {"schedule": "cosine"}, "aug": {"policy": "crop"}}, 3,
        [(1.5915318298339844, 0.39, 1.59178466796875, 0.37333333333333335, 1.6225889587402345, 0.17, 0.05),  # noqa: E501
         (1.5379814147949218, 0.36, 1.5403111775716145, 0.36, 1.3739724731445313, 0.35, 0.037500000000000006),  # noqa: E501
         (1.474169921875, 0.46, 1.4802435302734376, 0.4066666666666667, 1.182730484008789, 0.54, 0.012500000000000006)],  # noqa: E501
    ),
    "linear_probe_adamw": (
        {"train": {"optimizer": "adamw", "lr": 0.01, "epochs": 2}, "strategy": {"kind": "linear_probe"}}, 1,  # noqa: E501
        [(1.6133055114746093, 0.2, 1.6134410603841145, 0.2, 1.618647918701172, 0.2, 0.01),
         (1.6110667419433593, 0.2, 1.611404317220052, 0.2, 1.6138040161132812, 0.2, 0.01)],
    ),
    "full_sgd_wd_decay_all": (
        {"reg": {"weight_decay": 0.01, "decay_norm_bias": True}}, 2,
        [(1.5740283203125, 0.6, 1.575009053548177, 0.5866666666666667, 1.571492919921875, 0.24, 0.05),  # noqa: E501
         (1.3934767150878906, 0.84, 1.3992509969075522, 0.84, 1.0911203002929688, 0.63, 0.05),
         (0.9237864685058593, 0.78, 0.949468994140625, 0.7733333333333333, 0.6201023864746094, 0.97, 0.05)],  # noqa: E501
    ),
}
# fmt: on
# Goldens whose training amplifies last-bit differences from this epoch on (tests/recorded.py).
CHAOTIC_FROM = {"full_sgd_wd_decay_all": 2}
KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "train_loss_running")
KEYS += ("train_acc_running", "lr")


@pytest.mark.numerics
@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_baseline_history_matches_the_recorded_golden(task, case):
    """Regression golden, across machines. Catches a change to the baseline recipe's algorithm
    (the loss, the optimizer step, the schedule, the augmentation draws, the order of batches,
    the eval-mode measurement): any of them moves a loss far beyond 1e-4 relative or an accuracy
    by more than one example. Does not catch (by design) last-bit differences of another CPU's
    kernels; the bit-for-bit property on one machine is test_core's
    test_fit_is_deterministic_on_cpu. Every best epoch here is clear of ties by >= 5 examples."""
    sections, best_epoch, rows = GOLDEN[case]
    config = make_config(**{**sections, "train": {"threads": THREADS, **sections.get("train", {})}})
    threads = torch.get_num_threads()
    try:
        model = fresh_model(config)
        assert task.data_hash == GOLDEN_DATA, "the digits split changed: the golden is void"
        init = {
            f"{k}:{w}": v for k, (a, q) in GOLDEN_INIT.items() for w, v in (("abs", a), ("sq", q))
        }
        assert_matches_recorded(  # else the model's init changed: the golden is void
            _init_summary(model), init, where="the init", comparison="golden:init"
        )
        result = finetune.fit(config, model, task)
    finally:
        torch.set_num_threads(threads)
    n_train = min(len(task.y_train), config.data.eval_train_max)
    examples = {
        "train_acc": n_train,
        "val_acc": len(task.y_val),
        "train_acc_running": len(task.y_train),
    }
    assert_history_matches_recorded(
        result.history,
        [dict(zip(KEYS, row, strict=True)) for row in rows],
        examples=examples,
        comparison=f"golden:fit:{case}",
        chaotic_from=CHAOTIC_FROM.get(case),
    )
    for m in result.history:  # the derived metrics, from this run's own values: exactly
        assert set(m) == {*KEYS, "overfit_gap", "overfit_gap_loss"}
        assert m["overfit_gap"] == m["train_acc"] - m["val_acc"]
        assert m["overfit_gap_loss"] == m["val_loss"] - m["train_loss"]
    assert result.best_epoch == best_epoch


# --- frozen stages stay bit-identical --------------------------------------------------------
@pytest.mark.parametrize(("kind", "k"), [("linear_probe", 3), ("partial", 1), ("partial", 2)])
def test_frozen_stages_are_bit_identical(task, kind, k):
    # weight decay and momentum would move a frozen parameter that sat in the optimizer
    config = make_config(
        train={"epochs": 2, "lr": 0.1},
        strategy={"kind": kind, "freeze_stages": k},
        reg={"weight_decay": 0.05, "decay_norm_bias": True},
    )
    model = fresh_model(config)
    before = [snapshot(s) for s in models.stages(model)]
    head_before = snapshot(models.head_module(model))
    result = finetune.fit(config, model, task)
    after = [snapshot(s) for s in models.stages(model)]
    assert len(after) == 3
    for i in range(3):
        if i < k:  # frozen: parameters and BatchNorm statistics untouched
            assert same(before[i], after[i]), f"stage {i + 1} moved"
        else:  # trained: weights and statistics moved
            assert changed(before[i], after[i], "weight"), f"stage {i + 1} did not train"
            assert changed(before[i], after[i], "running_mean")
    assert not same(head_before, snapshot(models.head_module(model)))
    names = {g["name"] for g in result.param_groups[-1]}
    assert names == {"head"} | {f"stage{i}" for i in range(k + 1, 4)}
    # fit leaves requires_grad as it found it
    assert all(p.requires_grad for p in model.parameters())


def test_partial_freezing_every_stage_is_a_linear_probe(task):
    config = make_config(train={"epochs": 1}, strategy={"kind": "partial", "freeze_stages": 7})
    model = fresh_model(config)
    before = [snapshot(s) for s in models.stages(model)]
    finetune.fit(config, model, task)
    assert all(same(b, snapshot(s)) for b, s in zip(before, models.stages(model), strict=True))


def test_trainable_stages_schedule():
    def counts(n_stages=3, epochs=7, **kw):
        spec = StrategySpec(**kw)
        return [strategies.trainable_stages(spec, e, n_stages) for e in range(1, epochs + 1)]

    assert counts(kind="full") == [3] * 7
    assert counts(kind="linear_probe") == [0] * 7
    assert counts(kind="partial", freeze_stages=2) == [1] * 7
    assert counts(kind="lp_ft", lp_epochs=3) == [0, 0, 0, 3, 3, 3, 3]
    assert counts(kind="gradual_unfreeze") == [0, 1, 2, 3, 3, 3, 3]
    assert counts(kind="gradual_unfreeze", unfreeze_every=2) == [0, 0, 1, 1, 2, 2, 3]


def test_gradual_unfreeze_adds_stages_from_the_top(task):
    config = make_config(
        train={"epochs": 3, "lr": 0.1},
        strategy={"kind": "gradual_unfreeze", "unfreeze_every": 1},
        reg={"weight_decay": 0.05},
    )
    model = fresh_model(config)
    start = [snapshot(s) for s in models.stages(model)]
    rec = StageRecorder(model)
    result = finetune.fit(config, model, task, callbacks=[rec])
    assert [m["trainable_stages"] for m in result.history] == [0.0, 1.0, 2.0]
    # no gradient flows into a frozen stage
    assert rec.grad == {1: [False] * 3, 2: [False, False, True], 3: [False, True, True]}
    # epoch 1: the head only; epoch 2: + stage3; epoch 3: + stage2; stage1 never trains
    trained = {1: set(), 2: {2}, 3: {1, 2}}
    for epoch, live in trained.items():
        prev = start if epoch == 1 else rec.stages[epoch - 1]
        for i in range(3):
            moved = not same(prev[i], rec.stages[epoch][i])
            assert moved == (i in live), (epoch, i)
    assert same(start[0], snapshot(models.stages(model)[0]))
    # the optimizer grew: groups are added, none replaced; each keeps its own lr
    names = [[g["name"] for g in groups] for groups in result.param_groups]
    assert names[0] == ["head", "head.no_decay"]
    assert names[1] == names[0] + ["stage3"] + ["stage3.no_decay"]
    assert names[2] == names[1] + ["stage2", "stage2.no_decay"]


# --- LP-FT -----------------------------------------------------------------------------------
def test_lp_ft_switches_at_lp_epochs_plus_one(task):
    config = make_config(
        train={"epochs": 4, "lr": 0.1, "schedule": "cosine"},
        strategy={"kind": "lp_ft", "lp_epochs": 2, "ft_lr_scale": 0.5, "layer_decay": 0.5},
    )
    model = fresh_model(config)
    start = [snapshot(s) for s in models.stages(model)]
    rec = StageRecorder(model)
    result = finetune.fit(config, model, task, callbacks=[rec])
    assert [m["phase"] for m in result.history] == [0.0, 0.0, 1.0, 1.0]
    # linear probe: the backbone does not move, BatchNorm statistics included
    assert all(same(start[i], rec.stages[2][i]) for i in range(3))
    assert all(not same(rec.stages[2][i], rec.stages[3][i]) for i in range(3))
    groups = result.param_groups
    assert (
        [g["name"] for g in groups[0]]
        == ["head", "head.no_decay"]
        == [g["name"] for g in groups[1]]
    )
    assert [g["name"] for g in groups[2]] == [
        "head",
        "head.no_decay",
        *[n for i in (3, 2, 1) for n in (f"stage{i}", f"stage{i}.no_decay")],
    ]
    # each phase has its own cosine schedule: it starts again at full lr at the switch
    lrs = [m["lr"] for m in result.history]
    assert lrs[0] == 0.1 and lrs[2] == 0.1 * 0.5
    assert lrs[1] < lrs[0] and lrs[3] < lrs[2]
    ft = {g["name"]: g["lr"] for g in groups[2]}
    assert ft["stage3"] == 0.1 * 0.5 * 0.5**1 and ft["stage1"] == 0.1 * 0.5 * 0.5**3


# --- layer-wise lr decay, weight decay groups ------------------------------------------------
def test_layer_decay_learning_rates_per_named_group(task):
    config = make_config(
        train={"epochs": 1, "lr": 0.05},
        strategy={"layer_decay": 0.5, "head_lr_mult": 10.0},
        reg={"weight_decay": 0.01, "decay_norm_bias": True},
    )
    model = fresh_model(config)
    result = finetune.fit(config, model, task)
    lrs = {g["name"]: g["lr"] for g in result.param_groups[0]}
    assert lrs == {
        "head": 0.05 * 10.0,
        "stage3": 0.05 * 0.5**1,
        "stage2": 0.05 * 0.5**2,
        "stage1": 0.05 * 0.5**3,
    }
    assert result.history[0]["lr"] == 0.05 * 10.0  # the logged lr is the head's
    # each group holds exactly its stage's parameters
    units = strategies.model_units(model)
    groups = strategies.param_groups(units, config, 0.05)
    blocks = {"head": models.head_module(model)}
    blocks |= {f"stage{i + 1}": s for i, s in enumerate(models.stages(model))}
    for g in groups:
        assert {id(p) for p in g["params"]} == {id(p) for p in blocks[g["name"]].parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.parametrize("decay_norm_bias", [False, True])
def test_norm_and_bias_groups_get_no_weight_decay(task, decay_norm_bias):
    config = make_config(
        train={"epochs": 1}, reg={"weight_decay": 0.01, "decay_norm_bias": decay_norm_bias}
    )
    model = fresh_model(config)
    norms = {
        id(p)
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
        for p in m.parameters(recurse=False)
    }
    biases = {id(p) for n, p in model.named_parameters() if n.endswith(".bias")}
    groups = strategies.param_groups(strategies.model_units(model), config, 0.05)
    for g in groups:
        ids = {id(p) for p in g["params"]}
        if decay_norm_bias:
            assert not g["name"].endswith(".no_decay") and g["weight_decay"] == 0.01
        elif g["name"].endswith(".no_decay"):
            assert g["weight_decay"] == 0.0 and ids <= norms | biases
        else:
            assert g["weight_decay"] == 0.01 and not ids & (norms | biases)
    if not decay_norm_bias:
        in_no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
        assert in_no_decay == norms | biases and norms and biases
    logged = finetune.fit(config, model, task).param_groups[0]
    assert [(g["name"], g["weight_decay"]) for g in logged] == [
        (g["name"], g["weight_decay"]) for g in groups
    ]


# --- BatchNorm frozen ------------------------------------------------------------------------
@pytest.mark.parametrize("bn", ["frozen", "train"])
def test_bn_frozen_keeps_statistics_and_trains_affine(task, bn):
    config = make_config(train={"epochs": 2, "lr": 0.1}, strategy={"bn": bn})
    model = fresh_model(config)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    stats = [snapshot(m) for m in bns]
    finetune.fit(config, model, task)
    for m, before in zip(bns, stats, strict=True):
        after = snapshot(m)
        assert not torch.equal(before["weight"], after["weight"])  # affine params train
        assert not torch.equal(before["bias"], after["bias"])
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(before[key], after[key]) == (bn == "frozen"), key
