"""Regression goldens of the meta-learning and multi-task cores, and their best epoch chosen by
the objective's metric and direction (as `fit` does). CPU, one thread, the digits.

The goldens were captured with each core as it was before the cores were built on
`harness.core.shared` (commit e68e9bd): they catch a change to either algorithm (episode sampling,
the inner loop, the meta-update, the heads, the loss weighting, the schedule, the measurement)
and, through `tests/recorded.py`, absorb another CPU's last-bit differences: losses within
rel 1e-4, accuracies within one example. Bit-for-bit repeatability on one machine is tested
apart (test_meta's and test_multitask's run-twice tests)."""

from __future__ import annotations

import pytest
import torch
from recorded import THREADS, assert_history_matches_recorded

from harness.config.spec import DataSpec, ModelSpec, TrialConfig
from harness.core import meta, models, shared
from harness.core import multitask as mt
from harness.data import datasets as hdata

SPLIT = meta.DIGITS_SPLIT
# fmt: off
META_GOLDEN = {  # algorithm: (extra meta keys, per-epoch metrics)
    "protonet": ({"meta_lr": 1e-3}, [
        {"meta_train_loss": 0.9073373675346375, "meta_train_acc": 0.6527777910232544, "meta_val_loss": 0.9355427622795105, "meta_val_acc": 0.5416666865348816, "lr": 0.001},  # noqa: E501
        {"meta_train_loss": 0.6950351595878601, "meta_train_acc": 0.7222222089767456, "meta_val_loss": 0.9515273571014404, "meta_val_acc": 0.5486111044883728, "lr": 0.001},  # noqa: E501
    ]),
    "fomaml": ({"inner_lr": 0.4, "inner_steps": 2}, [
        {"meta_train_loss": 0.8893583416938782, "meta_train_acc": 0.6944444179534912, "meta_val_loss": 0.8940301537513733, "meta_val_acc": 0.8125, "lr": 0.001},  # noqa: E501
        {"meta_train_loss": 0.9094653129577637, "meta_train_acc": 0.7916666865348816, "meta_val_loss": 0.8936181664466858, "meta_val_acc": 0.805555522441864, "lr": 0.001},  # noqa: E501
    ]),
}
MT_GOLDEN = {  # weighting: per-epoch metrics (a subset of the keys)
    "fixed": [
        {"train_loss": 2.2267877197265626, "train_acc": 0.16666666666666666, "val_loss": 2.23140869140625, "val_acc": 0.18, "train_loss_running": 3.479957275390625, "parity_val_acc": 0.8133333333333334, "gt4_val_loss": 0.6932295227050781},  # noqa: E501
        {"train_loss": 1.5857829793294271, "train_acc": 0.5766666666666667, "val_loss": 1.6302492268880209, "val_acc": 0.58, "train_loss_running": 2.6583929443359375, "parity_val_acc": 0.81, "gt4_val_loss": 0.5673557535807292},  # noqa: E501
        {"train_loss": 1.0514044189453124, "train_acc": 0.5633333333333334, "val_loss": 1.1413607788085938, "val_acc": 0.5166666666666667, "train_loss_running": 1.5982803344726562, "parity_val_acc": 0.91, "gt4_val_loss": 0.5173070271809895},  # noqa: E501
    ],
    "uncertainty": [
        {"train_loss": 2.257607014973958, "train_acc": 0.12333333333333334, "val_loss": 2.2607499186197915, "val_acc": 0.11333333333333333, "train_loss_running": 3.1295416259765627, "parity_val_acc": 0.8166666666666667, "gt4_val_loss": 0.688028564453125, "digit_log_var": 1.22336745262146, "parity_log_var": -0.6051543354988098},  # noqa: E501
        {"train_loss": 2.092742716471354, "train_acc": 0.24333333333333335, "val_loss": 2.1199686686197916, "val_acc": 0.22666666666666666, "train_loss_running": 2.0559592692057294, "parity_val_acc": 0.74, "gt4_val_loss": 0.4543341573079427, "digit_log_var": 0.8115946650505066, "parity_log_var": -1.5946717262268066},  # noqa: E501
        {"train_loss": 2.9580574544270832, "train_acc": 0.2966666666666667, "val_loss": 3.1287890625, "val_acc": 0.25, "train_loss_running": 1.4356045532226562, "parity_val_acc": 0.81, "gt4_val_loss": 5.354080403645833, "digit_log_var": 0.47771841287612915, "parity_log_var": -1.3909896612167358},  # noqa: E501
    ],
}
# fmt: on


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pool():
    x, y, _, _ = meta.load_pool(DataSpec(), SPLIT)
    return x, y


@pytest.fixture(scope="module")
def digits() -> hdata.TaskData:
    return hdata.load_target(mt_config().data, seed=0)


def meta_config(objective: dict | None = None, **keys) -> TrialConfig:
    shape = {"meta_epochs": 2, "episodes_per_epoch": 6, "meta_batch_size": 3, "val_episodes": 12}
    tree = {"name": "g", "seed": 3, "task": {"kind": "meta"}, "meta": shape | {"queries": 4}}
    tree["meta"] |= keys
    tree |= {"model": {"pretrained": "none", "width": 8}}
    tree |= {"train": {"device": "cpu", "threads": THREADS}}
    return TrialConfig.model_validate(tree | ({"objective": objective} if objective else {}))


def mt_config(weighting: str = "fixed", objective: dict | None = None, **train) -> TrialConfig:
    tree = {
        "name": "g",
        "seed": 1,
        "model": {"pretrained": "none", "width": 8},
        "train": {"epochs": 3, "device": "cpu", "lr": 0.05, "threads": THREADS, **train},
        "data": {"target_classes": list(range(10)), "shots_per_class": 30},
        "multitask": {"weighting": weighting},
    }
    return TrialConfig.model_validate(tree | ({"objective": objective} if objective else {}))


def small_model(ways: int) -> models.ImageModel:
    shared.seed_everything(0)
    return models.build_model(ModelSpec(pretrained="none", width=8), ways)


@pytest.mark.numerics
@pytest.mark.parametrize("algorithm", sorted(META_GOLDEN))
def test_meta_fit_matches_the_recorded_golden(pool, algorithm):
    keys, rows = META_GOLDEN[algorithm]
    result = meta.meta_fit(meta_config(algorithm=algorithm, **keys), small_model(3), *pool, SPLIT)
    queries = 3 * 4  # ways x queries an episode
    examples = {"meta_train_acc": 6 * queries, "meta_val_acc": 12 * queries}
    assert_history_matches_recorded(
        result.history, rows, examples=examples, comparison=f"golden:meta:{algorithm}"
    )
    for m in result.history:  # derived from this run's own values: exactly
        assert m["adaptation_gap"] == m["meta_train_acc"] - m["meta_val_acc"]


@pytest.mark.numerics
@pytest.mark.parametrize("weighting", sorted(MT_GOLDEN))
def test_multitask_fit_matches_the_recorded_golden(digits, weighting):
    result = mt.multitask_fit(
        mt_config(weighting), small_model(10), mt.digit_tasks(digits.classes), digits
    )
    n = {"train": min(len(digits.y_train), 512), "val": len(digits.y_val)}
    examples = {"train_acc": n["train"], "val_acc": n["val"], "parity_val_acc": n["val"]}
    assert_history_matches_recorded(
        result.history,
        MT_GOLDEN[weighting],
        examples=examples,
        comparison=f"golden:multitask:{weighting}",
    )


def _best(history, metric, direction):
    values = [m[metric] for m in history]
    best = max(values) if direction == "maximize" else min(values)
    return values.index(best) + 1  # the first of equal values


@pytest.mark.parametrize(
    ("metric", "direction"),
    [("meta_val_loss", "minimize"), ("adaptation_gap", "minimize"), ("meta_val_acc", "maximize")],
)
def test_meta_fit_keeps_the_epoch_the_objective_picks(pool, metric, direction):
    """Before the loop kernel, meta_fit kept the best meta_val_acc whatever the objective."""
    config = meta_config({"metric": metric, "direction": direction}, meta_epochs=4, meta_lr=0.01)
    model = small_model(3)
    result = meta.meta_fit(config, model, *pool, SPLIT)
    assert result.best_epoch == _best(result.history, metric, direction)
    assert result.best == result.history[result.best_epoch - 1]


def test_meta_objective_that_disagrees_with_accuracy_picks_another_epoch(pool):
    """first-order MAML here: meta_val_loss falls every epoch while meta_val_acc peaks at
    epoch 1 (by several examples): a study minimising the loss gets epoch 4's weights."""
    keys = {"algorithm": "fomaml", "inner_steps": 1, "meta_epochs": 4, "meta_lr": 0.003}
    by_acc = meta.meta_fit(meta_config(**keys), small_model(3), *pool, SPLIT)
    loss = {"metric": "meta_val_loss", "direction": "minimize"}
    model = small_model(3)
    by_loss = meta.meta_fit(meta_config(loss, **keys), model, *pool, SPLIT)
    assert by_acc.history == by_loss.history  # the same training
    assert (by_acc.best_epoch, by_loss.best_epoch) == (1, 4)
    assert by_loss.best["meta_val_loss"] == min(m["meta_val_loss"] for m in by_loss.history)
    assert not all(torch.equal(by_acc.best_state[k], v) for k, v in by_loss.best_state.items())


@pytest.mark.parametrize(
    ("metric", "direction"), [("val_loss", "minimize"), ("overfit_gap", "minimize")]
)
def test_multitask_fit_keeps_the_epoch_the_objective_picks(digits, metric, direction):
    config = mt_config(objective={"metric": metric, "direction": direction}, epochs=4)
    result = mt.multitask_fit(config, small_model(10), mt.digit_tasks(digits.classes), digits)
    assert result.best_epoch == _best(result.history, metric, direction)
