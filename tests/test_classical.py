"""The classical reference of every report (reports.classical): C chosen on val, tested once,
on the study's own split; frozen features of a network when one is given."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import fresh_model, make_config

from harness.data import datasets as hdata
from harness.reports import classical


@pytest.fixture(scope="module")
def task():
    return hdata.load_target(make_config().data, 0)


def test_c_is_chosen_on_val_and_the_chosen_model_is_tested(task):
    refs = classical.references(task, seed=0)
    assert [r.model for r in refs] == ["logistic regression", "RBF SVC"]
    x = task.x_train.reshape(len(task.x_train), -1).float().div(255).numpy()
    xv = task.x_val.reshape(len(task.x_val), -1).float().div(255).numpy()
    for r in refs:
        assert r.inputs == "pixels" and r.c in classical.GRID[r.model]
        assert 0.5 < r.val_acc <= 1 and 0.5 < r.test_acc <= 1  # chance is 0.2
        # by hand: every C of the grid on val; the chosen one is the first of the best
        vals = []
        for c in classical.GRID[r.model]:
            model = classical._make(r.model, c, 0).fit(x, task.y_train.numpy())
            vals.append(float((model.predict(xv) == task.y_val.numpy()).mean()))
        assert r.val_acc == max(vals) and r.c == classical.GRID[r.model][int(np.argmax(vals))]
    assert refs == classical.references(task, seed=0)  # repeatable


def test_frozen_features_of_a_network(task):
    config = make_config()
    refs = classical.references(task, 0, fresh_model(config), "a random network")
    assert [r.inputs for r in refs[2:]] == ["frozen features of a random network"] * 2
    assert {r.metric for r in refs} == {
        "classical_logreg_pixels_test_acc",
        "classical_svc_pixels_test_acc",
        "classical_logreg_features_test_acc",
        "classical_svc_features_test_acc",
    }
