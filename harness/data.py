"""Data sets, seeded stratified splits, and batched on-device augmentation.

Small data sets live as uint8 image tensors (N, C, H, W) on the training device
(`TaskData.to`), so the training loop indexes them directly: no DataLoader, no per-image host
work. Conversion to float, resizing and normalization happen per batch on the device, inside
the model (`harness.models.Preprocess`), with the statistics each data set declares here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields

import numpy as np
import torch

from harness.spec import DataSpec

# Digits pixels are 0..16, stored as uint8 0..255; mean and std of all 1,797 images in [0, 1].
DIGITS_MEAN, DIGITS_STD = (0.3053,), (0.3759,)


class DataError(ValueError):
    """The data cannot serve the experiment as written (names the key and the numbers)."""


@dataclass(frozen=True)
class TaskData:
    """One classification task: train / val / test tensors, labels 0..num_classes-1."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[int, ...]  # the data set's own class ids, in label order
    data_hash: str  # identifies the exact split (indices of every image in each part)
    mean: tuple[float, ...]  # per-channel statistics of the data set, in [0, 1]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to(self, device: torch.device | str) -> TaskData:
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        rest = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in moved}
        return TaskData(**moved, **rest)

    @property
    def channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def image_size(self) -> int:
        return self.x_train.shape[-1]


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    bunch = load_digits()
    x = np.round(bunch.images[:, None] / 16.0 * 255.0).astype(np.uint8)  # (N, 1, 8, 8)
    return x, bunch.target.astype(np.int64)


STATS = {"digits": (DIGITS_MEAN, DIGITS_STD)}


def _load(dataset: str) -> tuple[np.ndarray, np.ndarray]:
    if dataset == "digits":
        return _digits()
    raise DataError(f"data.dataset: unknown data set {dataset!r}")


def _hash(*index_arrays: np.ndarray, dataset: str) -> str:
    h = hashlib.sha256(dataset.encode())
    for idx in index_arrays:
        h.update(np.ascontiguousarray(idx, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def _task(x, y, classes, parts: list[np.ndarray], dataset: str) -> TaskData:
    relabel = np.full(int(y.max()) + 1, -1, dtype=np.int64)
    relabel[list(classes)] = np.arange(len(classes))
    tensors = []
    for idx in parts:
        tensors += [torch.from_numpy(x[idx].copy()), torch.from_numpy(relabel[y[idx]])]
    mean, std = STATS[dataset]
    return TaskData(
        *tensors,
        classes=tuple(classes),
        data_hash=_hash(*parts, dataset=dataset),
        mean=mean,
        std=std,
    )


def load_target(spec: DataSpec, seed: int) -> TaskData:
    """The target task: k-shot train, val (selection and pruning), test (the rest; held out).

    Stratified and fixed by the seed: each class's images are shuffled once, then cut.
    """
    x, y = _load(spec.dataset)
    rng = np.random.default_rng(seed)
    train, val, test = [], [], []
    for c in spec.target_classes:
        idx = rng.permutation(np.flatnonzero(y == c))
        need = spec.shots_per_class + spec.val_per_class
        if len(idx) <= need:
            raise DataError(
                f"data: class {c} of {spec.dataset} has {len(idx)} images; shots_per_class "
                f"({spec.shots_per_class}) + val_per_class ({spec.val_per_class}) "
                "leaves no test images"
            )
        train.append(idx[: spec.shots_per_class])
        val.append(idx[spec.shots_per_class : need])
        test.append(idx[need:])
    parts = [np.sort(np.concatenate(p)) for p in (train, val, test)]
    return _task(x, y, spec.target_classes, parts, spec.dataset)


def load_source(spec: DataSpec, seed: int, val_fraction: float = 0.1) -> TaskData:
    """The source task for pretraining: every image of the source classes, 10% held for val."""
    if not spec.source_classes:
        raise DataError("data.source_classes: empty, but model.pretrained is 'source'")
    x, y = _load(spec.dataset)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in spec.source_classes:
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val = max(1, round(val_fraction * len(idx)))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    parts = [np.sort(np.concatenate(p)) for p in (train, val)]
    empty = np.zeros(0, dtype=np.int64)
    return _task(x, y, spec.source_classes, [*parts, empty], spec.dataset)
