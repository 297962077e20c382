"""The classical reference of every report (reports.classical): each model's settings (C, the
SVC's gamma, with or without standardization) chosen on val, refitted on train, tested once,
on the study's own split; frozen features of a network when one is given."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import fresh_model, make_config
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from harness.data import datasets as hdata
from harness.reports import classical


@pytest.fixture(scope="module")
def task():
    return hdata.load_target(make_config().data, 0)


@pytest.fixture(scope="module")
def refs(task):
    return classical.references(task, seed=0)


def _flat(x) -> np.ndarray:
    return x.reshape(len(x), -1).float().div(255).numpy()


def _by_hand(model: str, x, y, xv, yv, xt, yt):
    """The same grid walked by hand in its documented order (scaler none before standard, C
    ascending, then gamma ascending), each setting fitted on train and scored on val, the first
    best kept (ties: the earlier); then its correctness on test."""
    best = None
    for scaler in ("none", "standard"):
        a, b, c = x, xv, xt
        if scaler == "standard":
            s = StandardScaler().fit(x)
            a, b, c = s.transform(x), s.transform(xv), s.transform(xt)
        scale = 1.0 / (a.shape[1] * np.asarray(a, np.float64).var())
        gammas = [None] if model == classical.LOGREG else [m * scale for m in classical.SVC_GAMMA]
        for cc in classical.LOGREG_C if model == classical.LOGREG else classical.SVC_C:
            for gamma in gammas:
                if gamma is None:
                    fitted = LogisticRegression(C=cc, max_iter=3000).fit(a, y)
                else:
                    fitted = SVC(C=cc, kernel="rbf", gamma=gamma).fit(a, y)
                acc = float((fitted.predict(b) == yv).mean())
                if best is None or acc > best[0]:
                    params = {"C": cc} | ({} if gamma is None else {"gamma": gamma})
                    best = (acc, params | {"scaler": scaler}, fitted.predict(c) == yt)
    return best


def test_the_search_is_a_hand_loop_over_the_grid_and_the_choice_is_tested_once(task, refs):
    assert [r.model for r in refs] == ["logistic regression", "RBF SVC"]
    x, xv, xt = _flat(task.x_train), _flat(task.x_val), _flat(task.x_test)
    y, yv, yt = task.y_train.numpy(), task.y_val.numpy(), task.y_test.numpy()
    for r in refs:
        assert r.inputs == "pixels" and r.searched == classical.searched(r.model)
        assert 0.5 < r.val_acc <= 1 and 0.5 < r.test_acc <= 1  # chance is 0.2
        val_acc, params, correct = _by_hand(r.model, x, y, xv, yv, xt, yt)
        assert r.val_acc == val_acc
        assert r.params.keys() == params.keys() and r.params["scaler"] == params["scaler"]
        for key in params.keys() - {"scaler"}:
            assert r.params[key] == pytest.approx(params[key], rel=1e-6)
        # refitted on train alone and tested once: the hand refit's test accuracy, per example
        assert r.test_correct.dtype == bool and len(r.test_correct) == len(yt)
        np.testing.assert_array_equal(r.test_correct, correct)
        assert r.test_correct.mean() == r.test_acc
    assert "settings, chosen on val" in refs[1].searched and "gamma" in refs[1].searched


def test_repeatable_and_the_per_example_vector_is_not_compared(task, refs):
    again = classical.references(task, seed=0)
    assert again == refs
    assert "test_correct" not in repr(refs[0])


def test_the_grid_counts_its_settings():
    x = np.random.default_rng(0).random((20, 6))
    svc = classical.grid(classical.SVC, x)
    assert [len(g["clf__C"]) * len(g["kernel__gamma"]) for g in svc] == [25, 25]
    assert svc[0]["kernel__gamma"][2] == pytest.approx(1 / (6 * x.var()))  # 'scale' itself
    assert classical.searched(classical.SVC).endswith(": 50 settings, chosen on val")
    n = 2 * len(classical.LOGREG_C)
    assert classical.searched(classical.LOGREG).endswith(f": {n} settings, chosen on val")


def test_the_precomputed_kernel_is_the_rbf_svc():
    rng = np.random.default_rng(1)
    x, y, xt = rng.random((60, 8)), rng.integers(0, 3, 60), rng.random((40, 8))
    ours = classical.pipeline(classical.SVC).set_params(clf__C=3.0, kernel__gamma=0.7)
    theirs = SVC(C=3.0, kernel="rbf", gamma=0.7)
    np.testing.assert_allclose(
        ours.fit(x, y).decision_function(xt), theirs.fit(x, y).decision_function(xt), atol=1e-9
    )


def test_frozen_features_of_a_network(task):
    config = make_config()
    refs = classical.references(task, 0, fresh_model(config), "a random network")
    assert [r.inputs for r in refs[2:]] == ["frozen features of a random network"] * 2
    assert all(len(r.test_correct) == len(task.y_test) for r in refs)
    assert {r.metric for r in refs} == {
        "classical_logreg_pixels_test_acc",
        "classical_svc_pixels_test_acc",
        "classical_logreg_features_test_acc",
        "classical_svc_features_test_acc",
    }
