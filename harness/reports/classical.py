"""A classical reference for every report: on the study's own split, a logistic regression and
an RBF SVC (scikit-learn) on the raw pixels and, where the study starts from pretrained
weights, on that network's frozen pooled features. Each model's C is chosen on the val split,
then the chosen one is tested once. A person sees at once whether deep fine-tuning beat them.

Knows neither Optuna nor MLflow.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

MAX_TRAIN = 5000  # images a classical model is fitted on (the k-shot splits are far smaller)
GRID = {"logistic regression": (0.01, 0.1, 1.0, 10.0), "RBF SVC": (0.1, 1.0, 10.0, 100.0)}


@dataclass(frozen=True)
class Reference:
    model: str  # "logistic regression", "RBF SVC"
    inputs: str  # "pixels", or "frozen features of <start>"
    c: float  # the C chosen on val
    val_acc: float
    test_acc: float  # measured once, with the chosen C

    @property
    def label(self) -> str:
        return f"{self.model} on {self.inputs}"

    @property
    def metric(self) -> str:
        """Its test accuracy's name on the study's parent run."""
        model = "logreg" if self.model == "logistic regression" else "svc"
        return f"classical_{model}_{'pixels' if self.inputs == 'pixels' else 'features'}_test_acc"


def _make(model: str, c: float, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    if model == "logistic regression":
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))
    return make_pipeline(StandardScaler(), SVC(C=c, kernel="rbf", gamma="scale", random_state=seed))


def fit_reference(x_train, y_train, x_val, y_val, x_test, y_test, inputs: str, seed: int = 0):
    """Each model's C by val accuracy (the first of equal ones), then its test accuracy once."""
    rng = np.random.default_rng(seed)
    if len(x_train) > MAX_TRAIN:
        keep = np.sort(rng.choice(len(x_train), MAX_TRAIN, replace=False))
        x_train, y_train = x_train[keep], y_train[keep]
    out = []
    for model, grid in GRID.items():
        best = None
        for c in grid:
            with warnings.catch_warnings():  # convergence warnings of the small grids
                warnings.simplefilter("ignore")
                fitted = _make(model, c, seed).fit(x_train, y_train)
            acc = float((fitted.predict(x_val) == y_val).mean())
            if best is None or acc > best[0]:
                best = (acc, c, fitted)
        val_acc, c, fitted = best
        test_acc = float((fitted.predict(x_test) == y_test).mean())
        out.append(Reference(model, inputs, c, val_acc, test_acc))
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
