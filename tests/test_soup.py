"""Model soups, unit level (harness.core.soup) on tiny real models of the digits task: the
average, the greedy recipe, BatchNorm statistics measured again, and compatibility."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import fresh_model, make_config

from harness.core import finetune, soup, tasks


@pytest.fixture(scope="module")
def trained(task):
    """Three small CNNs fine-tuned 2 epochs from one start at three learning rates, and a fourth
    model of random weights (an ingredient that can only hurt)."""
    states = []
    for lr in (0.05, 0.02, 0.1):
        config = make_config(train={"epochs": 2, "lr": lr})
        model = fresh_model(config)
        result = finetune.fit(config, model, task)
        states.append({k: v.clone() for k, v in result.best_state.items()})
    torch.manual_seed(123)
    noise = {
        k: torch.randn_like(v) if v.is_floating_point() else v.clone() for k, v in states[0].items()
    }
    return make_config(train={"epochs": 2}), states, noise


def _val_acc(config, task, state, n: int = 2) -> float:
    model = fresh_model(config)
    model.load_state_dict(state)
    if n > 1:
        soup.recompute_bn(model, task.x_train)
    return tasks.split_scores(config, model, task, "val")[0]["val_acc"]


def test_a_soup_of_two_identical_models_is_the_model(trained):
    _, states, _ = trained
    averaged = soup.average([states[0], copy.deepcopy(states[0])])
    assert averaged.keys() == states[0].keys()
    for k, v in states[0].items():
        assert torch.equal(averaged[k], v), k


def test_uniform_average_is_the_mean_and_keeps_integer_buffers(trained):
    _, states, _ = trained
    averaged = soup.average(states)
    for k, v in states[0].items():
        if v.is_floating_point():
            mean = sum(s[k].double() for s in states) / 3
            assert torch.allclose(averaged[k].double(), mean, rtol=0, atol=1e-6), k
            assert averaged[k].dtype == v.dtype
        else:  # num_batches_tracked: the first ingredient's
            assert torch.equal(averaged[k], v), k


def test_greedy_never_keeps_an_ingredient_that_lowers_val(trained, task):
    config, states, noise = trained
    ordered = [*states, noise]  # the random weights last: they must be refused
    scores = []

    def score(state, n):
        scores.append(_val_acc(config, task, state, n))
        return scores[-1]

    kept, final, steps = soup.greedy(ordered, score)
    assert kept[0] == 0 and 3 not in kept  # the random ingredient lowered val: left out
    best = steps[0].score
    for step in steps[1:]:
        assert step.kept == (step.score >= best), step
        if step.kept:
            best = step.score
    assert final == best >= steps[0].score  # never worse than the first ingredient alone
    assert steps[0].score == _val_acc(config, task, ordered[0], 1)  # the model as it trained
    soup_of_kept = soup.average([ordered[i] for i in kept])
    assert final == pytest.approx(_val_acc(config, task, soup_of_kept, len(kept)))


def test_batchnorm_statistics_are_measured_again_on_train(trained, task):
    config, states, _ = trained
    averaged = soup.average(states[:2])
    model = fresh_model(config)
    model.load_state_dict(averaged)
    assert soup.recompute_bn(model, task.x_train, batch_size=32)
    bn = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn
    # by hand: fresh statistics, a cumulative average over the same batches in train mode
    by_hand = fresh_model(config)
    by_hand.load_state_dict(averaged)
    for m in by_hand.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    by_hand.train()
    with torch.no_grad():
        for i in range(0, len(task.x_train), 32):
            by_hand(task.x_train[i : i + 32])
    hand = dict(by_hand.named_modules())
    for name, m in bn:
        assert torch.allclose(m.running_mean, hand[name].running_mean, atol=1e-6)
        assert torch.allclose(m.running_var, hand[name].running_var, atol=1e-6)
        # and not the averaged running statistics
        assert not torch.allclose(m.running_mean, averaged[f"{name}.running_mean"], atol=1e-4)
    assert not model.training  # left in eval mode


def test_compatible_names_the_first_difference(trained):
    _, states, _ = trained
    assert soup.compatible(states[0], states[1]) is None
    other = make_config(model={"width": 8})
    small = fresh_model(other).state_dict()
    why = soup.compatible(states[0], small)
    assert why is not None and "net." in why and "(" in why
    fewer = {k: v for k, v in states[0].items() if "head" not in k}
    assert "different parameters" in soup.compatible(states[0], fewer)


def test_a_soup_needs_an_ingredient():
    with pytest.raises(ValueError, match="at least one"):
        soup.average([])
