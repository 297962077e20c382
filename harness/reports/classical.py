"""A classical reference for every report: on the study's own split, a logistic regression and
an RBF SVC (scikit-learn) on the raw pixels and, where the study starts from pretrained
weights, on that network's frozen pooled features.

Each model's settings are searched as a careful person would: the logistic regression's C and
the RBF SVC's C and gamma, each with and without standardization (a `StandardScaler` step or
'passthrough' as a grid dimension). Every setting is fitted on the train split and scored on the
val split only (`PredefinedSplit` + `GridSearchCV(refit=False)`); the best is refitted on the
train split alone (not train + val) and tested once. Ties: GridSearchCV's rank, i.e. the first
best in grid order (scaler none before standard, then C ascending, then gamma ascending).
The SVC is `SVC(kernel="precomputed")` on an RBF kernel step (`RBFKernel`): the same model as
`SVC(kernel="rbf")`, faster on wide features.

Knows neither Optuna nor MLflow.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, clone

MAX_TRAIN = 5000  # images a classical model is fitted on (the k-shot splits are far smaller)
LOGREG = "logistic regression"
SVC = "RBF SVC"
MODELS = (LOGREG, SVC)
LOGREG_C = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
SVC_C = (0.1, 1.0, 10.0, 100.0, 1000.0)
# gamma as multiples of scikit-learn's gamma='scale', 1 / (n_features * var), of the train
# inputs as the SVC sees them (after the scaler, if any): sensible for pixels in [0, 1] and for
# standardized or raw frozen features alike
SVC_GAMMA = (0.1, 0.3, 1.0, 3.0, 10.0)
SCALERS = ("none", "standard")


def _fmt(values) -> str:
    return "{" + ", ".join(f"{v:g}" for v in values) + "}"


def searched(model: str) -> str:
    """What was searched for `model`, in words."""
    scalers = f"scaler in {{{', '.join(SCALERS)}}}"
    if model == LOGREG:
        n = len(LOGREG_C) * len(SCALERS)
        return f"C in {_fmt(LOGREG_C)} x {scalers}: {n} settings, chosen on val"
    n = len(SVC_C) * len(SVC_GAMMA) * len(SCALERS)
    return (
        f"C in {_fmt(SVC_C)} x gamma in 'scale' x {_fmt(SVC_GAMMA)} x {scalers}: "
        f"{n} settings, chosen on val"
    )


@dataclass(frozen=True)
class Reference:
    model: str  # "logistic regression", "RBF SVC"
    inputs: str  # "pixels", or "frozen features of <start>"
    params: dict  # chosen on val: {"C": 1.0, "scaler": "none"} (+ "gamma": 0.11 for the SVC)
    searched: str  # what the choice was made among, in words
    val_acc: float
    test_acc: float  # measured once, with the chosen setting refitted on the train split
    # per test example (in test-split order): whether it was classified right, for paired tests
    test_correct: np.ndarray = field(
        default_factory=lambda: np.zeros(0, bool), repr=False, compare=False
    )

    @property
    def label(self) -> str:
        return f"{self.model} on {self.inputs}"

    @property
    def metric(self) -> str:
        """Its test accuracy's name on the study's parent run."""
        model = "logreg" if self.model == LOGREG else "svc"
        return f"classical_{model}_{'pixels' if self.inputs == 'pixels' else 'features'}_test_acc"

    @property
    def setting(self) -> str:
        """The chosen params in words: 'C=1 gamma=0.111 scaler=none'."""
        return " ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.params.items()
        )


class RBFKernel(TransformerMixin, BaseEstimator):
    """The RBF kernel exp(-gamma |x - x'|^2) of inputs against the train inputs it was fitted
    on, for `SVC(kernel="precomputed")`: the same model as `SVC(kernel="rbf", gamma=gamma)`,
    its distances by BLAS (scikit-learn's `rbf_kernel`) instead of libsvm's own loop, several
    times faster on wide frozen features (its 50 settings on 1000 train images of 2048
    features: 11 s against 51 s on 2 busy CPU cores)."""

    def __init__(self, gamma: float = 1.0):
        self.gamma = gamma

    def fit(self, x, y=None):
        self.x_ = np.asarray(x, dtype=np.float64)
        return self

    def transform(self, x):
        from sklearn.metrics.pairwise import rbf_kernel

        return rbf_kernel(np.asarray(x, dtype=np.float64), self.x_, gamma=self.gamma)


def pipeline(model: str, seed: int = 0):
    """The model behind a scaler step `scale` ('passthrough' or a StandardScaler: a grid
    dimension) as `clf`; the SVC's kernel is the step `kernel` (`RBFKernel`)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.svm import SVC as SVClassifier

    if model == LOGREG:
        return Pipeline([("scale", "passthrough"), ("clf", LogisticRegression(max_iter=3000))])
    svc = SVClassifier(kernel="precomputed", random_state=seed)
    return Pipeline([("scale", "passthrough"), ("kernel", RBFKernel()), ("clf", svc)])


def gamma_scale(x: np.ndarray) -> float:
    """scikit-learn's gamma='scale' for inputs `x`: 1 / (n_features * x.var())."""
    var = float(np.asarray(x, dtype=np.float64).var())
    return 1.0 / (x.shape[1] * var) if var > 0 else 1.0


def grid(model: str, x_train: np.ndarray) -> list[dict]:
    """`model`'s search as GridSearchCV's param grid, one dict per scaler in SCALERS order; the
    SVC's gammas are SVC_GAMMA times gamma='scale' of the train inputs after that scaler.
    GridSearchCV walks it in that order, C (`clf__C`) before gamma (`kernel__gamma`)."""
    from sklearn.preprocessing import StandardScaler

    out = []
    for name in SCALERS:
        step = "passthrough" if name == "none" else StandardScaler()
        if model == LOGREG:
            out.append({"scale": [step], "clf__C": list(LOGREG_C)})
            continue
        seen = x_train if name == "none" else StandardScaler().fit_transform(x_train)
        scale = gamma_scale(seen)
        gammas = [float(m * scale) for m in SVC_GAMMA]
        out.append({"scale": [step], "clf__C": list(SVC_C), "kernel__gamma": gammas})
    return out


def _params(grid_params: dict) -> dict:
    """GridSearchCV's params as plain values: {"C": .., "gamma": .., "scaler": "none"}."""
    out = {k.split("__")[-1]: float(v) for k, v in grid_params.items() if k != "scale"}
    out["scaler"] = "none" if grid_params["scale"] == "passthrough" else "standard"
    return out


@contextlib.contextmanager
def _quiet(model: str):
    """Convergence warnings of the grid's extremes silenced; the logistic regression's BLAS on
    one thread: its lbfgs steps are small products that threads only slow down (its 14 settings
    on 1000 x 2048 features: 4 s on one thread, 13 to 70 s on two busy cores)."""
    from threadpoolctl import threadpool_limits

    with warnings.catch_warnings(), threadpool_limits(1 if model == LOGREG else None, "blas"):
        warnings.simplefilter("ignore")
        yield


def choose(model: str, x_train, y_train, x_val, y_val, seed: int = 0) -> tuple[dict, float]:
    """`model`'s setting chosen on val: every grid point fitted on train, scored on val
    (PredefinedSplit, GridSearchCV(refit=False)); the first best in grid order. Returns
    GridSearchCV's best params and their val accuracy."""
    from sklearn.model_selection import GridSearchCV, PredefinedSplit

    split = PredefinedSplit(np.r_[np.full(len(y_train), -1), np.zeros(len(y_val), int)])
    search = GridSearchCV(
        pipeline(model, seed),
        grid(model, x_train),
        scoring="accuracy",
        cv=split,
        refit=False,
        n_jobs=1,
        error_score="raise",
    )
    with _quiet(model):
        search.fit(np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val]))
    return search.best_params_, float(search.best_score_)


def fit_reference(x_train, y_train, x_val, y_val, x_test, y_test, inputs: str, seed: int = 0):
    """Each model's setting chosen on val (`choose`), refitted on the train split alone, tested
    once; `test_correct` per test example, in the test split's order."""
    rng = np.random.default_rng(seed)
    if len(x_train) > MAX_TRAIN:
        keep = np.sort(rng.choice(len(x_train), MAX_TRAIN, replace=False))
        x_train, y_train = x_train[keep], y_train[keep]
    out = []
    for model in MODELS:
        best, val_acc = choose(model, x_train, y_train, x_val, y_val, seed)
        with _quiet(model):
            fitted = pipeline(model, seed).set_params(**clone(best, safe=False))
            fitted.fit(x_train, y_train)
        correct = np.asarray(fitted.predict(x_test) == y_test, dtype=bool)
        out.append(
            Reference(
                model,
                inputs,
                _params(best),
                searched(model),
                val_acc,
                float(correct.mean()),
                correct,
            )
        )
    return out


def _tensor(x) -> torch.Tensor:
    """A split's images as one CPU tensor (a memory-mapped `HostImages` split is read)."""
    return x if isinstance(x, torch.Tensor) else x[:].cpu()


def _pixels(x: torch.Tensor) -> np.ndarray:
    return x.reshape(len(x), -1).float().div(255.0).cpu().numpy()


@torch.inference_mode()
def _features(model, x: torch.Tensor, batch: int = 256) -> np.ndarray:
    """The network's pooled features (the input of its head), in eval mode."""
    from harness.core import models

    store: list[torch.Tensor] = []
    hook = models.head_module(model).register_forward_pre_hook(
        lambda _m, args: store.append(args[0].flatten(1))
    )
    model.eval()
    try:
        for start in range(0, len(x), batch):
            model(x[start : start + batch])
    finally:
        hook.remove()
    return torch.cat(store).float().cpu().numpy()


def references(data, seed: int = 0, pretrained_model=None, start: str = "") -> list[Reference]:
    """The classical models on `data`'s split (a `TaskData`): pixels, and the frozen features
    of `pretrained_model` (the study's starting weights, described by `start`) when given."""
    keep = torch.arange(len(data.y_train))
    if len(keep) > MAX_TRAIN:  # before any image is read: a large split stays on disk
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(keep), generator=g)[:MAX_TRAIN].sort().values
    x_train = data.x_train  # a HostImages split gathers only the kept rows
    x_train = x_train[keep] if isinstance(x_train, torch.Tensor) else x_train.gather(keep)
    y = [data.y_train.cpu()[keep].numpy(), data.y_val.cpu().numpy(), data.y_test.cpu().numpy()]
    xs = [x_train.cpu(), _tensor(data.x_val), _tensor(data.x_test)]
    out = fit_reference(*_interleave([_pixels(x) for x in xs], y), "pixels", seed)
    if pretrained_model is not None:
        feats = [_features(pretrained_model, x) for x in xs]
        out += fit_reference(*_interleave(feats, y), f"frozen features of {start}", seed)
    return out


def _interleave(xs, ys):
    return [v for pair in zip(xs, ys, strict=True) for v in pair]
