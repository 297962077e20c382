"""Data sets, seeded stratified splits, and the data checks.

Small data sets live as uint8 image tensors (N, C, H, W) on the training device
(`TaskData.to`), so the training loop indexes them directly: no DataLoader, no per-image host
work. Conversion to float, resizing and normalization happen per batch on the device, inside
the model (`harness.core.models.Preprocess`), with the statistics each data set declares here.

Data sets: scikit-learn's bundled `digits`; torchvision's `cifar10`, `cifar100`, `mnist` and
`fashionmnist`, read by torchvision's own classes from `data.root` at native resolution
(downloaded there only when `data.download` is true); and `imagefolder`, a folder of class
subfolders of images, resized to one square size at load. Each is decoded once per process
(`sources`), since every trial calls `load_target`; given a `cache_dir` (the study passes
RESULTS/cache/data), an image folder is decoded once per machine, in parallel, into a cache
that every later process memory-maps (`harness.data.datacache`), and its train split reaches the
device all at once or, when larger than `data.device_budget_gb`, batch by batch
(`harness.data.stream`). Every task is checked: unreadable images
are skipped and reported, and exact duplicate images across train/val/test (leakage) are an
error unless `data.allow_duplicates`; `TaskData.report` says what was found.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from harness.config.spec import DataSpec
from harness.data.sources import SHOW, DataError, DecodedSet, DecodedSplit, open_set
from harness.data.stream import HostImages
from harness.data.taskdata import DataReport, TaskData

VAL_FRACTION = 0.1  # of each source class, held out as the source task's val split


# --- Decoded data sets, cached per process. ---


# --- torchvision data sets: read by torchvision's own classes from data.root. ---


# --- imagefolder: class subfolders of images, resized to one square size at load. ---


# --- Splits. ---
def _class_indices(data: DecodedSet, given: tuple[int | str, ...], key: str) -> list[int]:
    """The data set's class index of each class id given (a folder name or an index)."""
    names = data.pool.names
    out = []
    for c in given:
        if isinstance(c, str):
            if c not in names:
                raise DataError(
                    f"data.{key}: {c!r} is not a class of {data.where}; its classes are "
                    f"{list(names)}"
                )
            out.append(names.index(c))
        elif not 0 <= c < len(names):
            raise DataError(
                f"data.{key}: class index {c} is out of range: {data.where} has {len(names)} "
                f"classes (0..{len(names) - 1}: {list(names)[:20]})"
            )
        else:
            out.append(c)
    if len(set(out)) != len(out):
        raise DataError(f"data.{key}: {list(given)} names one class twice (of {list(names)})")
    return out


def _hash(*index_arrays: np.ndarray, dataset: str, extra: tuple[str, ...] = ()) -> str:
    h = hashlib.sha256(dataset.encode())
    for idx in index_arrays:
        h.update(np.ascontiguousarray(idx, dtype=np.int64).tobytes())
        h.update(b"|")
    for item in extra:
        h.update(item.encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def _duplicates(parts: list[tuple[str, DecodedSplit, np.ndarray]]) -> tuple[int, list[str]]:
    """Images of a later part equal to one of an earlier part: their number and a few."""
    seen: dict[str, str] = {}
    count, examples = 0, []
    for part, split, idx in parts:
        here: dict[str, str] = {}
        for i in idx.tolist():
            digest = split.hashes[i]
            if digest in seen:
                count += 1
                if len(examples) < SHOW:
                    examples.append(f"{part} {split.name_of(i)} = {seen[digest]}")
            else:
                here.setdefault(digest, f"{part} {split.name_of(i)}")
        seen.update(here)
    return count, examples


def _task(
    data: DecodedSet,
    spec: DataSpec,
    given: tuple[int | str, ...],
    indices: list[int],
    parts: list[tuple[str, DecodedSplit, np.ndarray]],
) -> TaskData:
    count, examples = _duplicates(parts)
    if count and not spec.allow_duplicates:
        raise DataError(
            f"data: {count} exact duplicate image(s) across train/val/test of {data.where} "
            f"(leakage: a held-out image is also a training or val image), e.g. "
            f"{'; '.join(examples)}. Remove them from the data, or set "
            "data.allow_duplicates: true to keep them (they are then only reported)"
        )
    relabel = np.full(len(data.pool.names), -1, dtype=np.int64)
    relabel[indices] = np.arange(len(indices))
    tensors = []
    extra = list(data.extra_hash)
    for part, split, idx in parts:
        if isinstance(split.x, np.memmap):  # the cache's rows: read when they go to the device
            x = HostImages(split.x, idx, spec.device_budget_gb)
        else:
            x = torch.from_numpy(np.asarray(split.x[idx]))
        tensors += [x, torch.from_numpy(relabel[split.y[idx]])]
        if split.files:  # imagefolder: the exact files and their decoded contents
            extra += [f"{part} {split.files[i]} {split.hashes[i]}" for i in idx.tolist()]
    while len(tensors) < 6:  # the source task has no test split
        tensors += [torch.from_numpy(np.array(data.pool.x[:0])), torch.zeros(0, dtype=torch.int64)]
    indices_hashed = [idx for _, _, idx in parts]
    indices_hashed += [np.zeros(0, np.int64)] * (3 - len(parts))  # source: an empty test
    report = DataReport(
        dataset=data.where,
        skipped=data.skipped,
        duplicates=count,
        duplicate_examples=tuple(examples),
        duplicates_allowed=bool(count),
    )
    return TaskData(
        *tensors,
        classes=tuple(given),
        data_hash=_hash(*indices_hashed, dataset=spec.dataset, extra=tuple(extra)),
        mean=data.mean,
        std=data.std,
        report=report,
    )


def _too_few(data: DecodedSet, given, n: int, spec: DataSpec, test_from_pool: bool) -> DataError:
    s, v, t = spec.shots_per_class, spec.val_per_class, spec.test_per_class
    n_val = 0 if data.val is not None else v
    asked = " + ".join(
        ([f"shots_per_class ({s})"] if s is not None else [])
        + ([f"val_per_class ({v})"] if n_val else [])
        + ([f"test_per_class ({t})"] if test_from_pool and t is not None else [])
    )
    if s is None:  # every other image trains: at least one must be left
        return DataError(
            f"data: class {given} of {data.where} has {n} images; {asked} leaves none for "
            "training (shots_per_class: null)"
        )
    if test_from_pool:
        if t is not None:
            return DataError(
                f"data: class {given} of {data.where} has {n} images; {asked} needs {s + n_val + t}"
            )
        return DataError(
            f"data: class {given} of {data.where} has {n} images; {asked} leaves no test images"
        )
    return DataError(
        f"data: class {given} of {data.where} has {n} train images; {asked} needs {s + n_val}"
    )


def load_target(
    spec: DataSpec, seed: int, size_hint: int | None = None, cache_dir: Path | None = None
) -> TaskData:
    """The target task: k-shot train, val (selection and pruning), test (held out).

    Stratified and fixed by the seed: each class's train-split images are shuffled once, then
    cut into `shots_per_class` train and `val_per_class` val images (val from the val/ folder
    when an imagefolder has one). Test is the official test split or the test/ folder,
    restricted to the target classes, else the rest of each class (or `test_per_class` of it).
    `size_hint` (the model's input side) sizes imagefolder images when data.image_size is unset.
    `cache_dir`: an imagefolder is decoded once into this folder and memory-mapped from it
    (`harness.data.datacache`); None: decoded in this process only.
    """
    data = open_set(spec, size_hint, with_test=True, cache_dir=cache_dir)
    indices = _class_indices(data, spec.target_classes, "target_classes")
    s, v, t = spec.shots_per_class, spec.val_per_class, spec.test_per_class
    test_from_pool = data.test is None
    if s is None and test_from_pool and t is None:
        raise DataError(
            f"data.shots_per_class: null takes every image of {data.where} for training and "
            "leaves no test images; set data.test_per_class, or give a number of shots"
        )
    rng = np.random.default_rng(seed)
    train, val, test = [], [], []
    for c, given in zip(indices, spec.target_classes, strict=True):
        pool = rng.permutation(np.flatnonzero(data.pool.y == c))
        if data.val is not None:
            own = rng.permutation(np.flatnonzero(data.val.y == c))
            if len(own) < v:
                raise DataError(
                    f"data: class {given} of {data.where} has {len(own)} images in val/; "
                    f"val_per_class is {v}"
                )
            val.append(own[:v])
        n_val = 0 if data.val is not None else v
        n_test = 0 if not test_from_pool else (t or 0)
        shots = len(pool) - n_val - n_test if s is None else s
        enough = len(pool) - shots - n_val - n_test >= (1 if test_from_pool and not t else 0)
        if shots < 1 or not enough:
            raise _too_few(data, given, len(pool), spec, test_from_pool)
        if s is None:  # every image but val's and test's: cut those first
            cut = [pool[:n_val], pool[n_val : n_val + n_test], pool[n_val + n_test :]]
            val_part, test_part, train_part = cut
        else:
            train_part, val_part = pool[:s], pool[s : s + n_val]
            rest = pool[s + n_val :]
            test_part = rest[:t] if t else rest
        train.append(train_part)
        if data.val is None:
            val.append(val_part)
        if test_from_pool:
            test.append(test_part)
    if not test_from_pool:
        test_idx = np.flatnonzero(np.isin(data.test.y, indices))
        counts = np.bincount(data.test.y[test_idx], minlength=len(data.pool.names))
        empty = [g for c, g in zip(indices, spec.target_classes, strict=True) if not counts[c]]
        if empty:
            raise DataError(f"data: the test split of {data.where} has no images of {empty}")
        test = [test_idx]
    parts = [
        ("train", data.pool, np.sort(np.concatenate(train))),
        ("val", data.pool if data.val is None else data.val, np.sort(np.concatenate(val))),
        ("test", data.pool if data.test is None else data.test, np.sort(np.concatenate(test))),
    ]
    return _task(data, spec, spec.target_classes, indices, parts)


def load_source(
    spec: DataSpec,
    seed: int,
    size_hint: int | None = None,
    val_fraction: float = VAL_FRACTION,
    cache_dir: Path | None = None,
) -> TaskData:
    """The source task for pretraining: every train-split image of the source classes, 10% of
    each class held out for val (no test split). `cache_dir` as for `load_target`."""
    if not spec.source_classes:
        raise DataError("data.source_classes: empty, but model.pretrained is 'source'")
    data = open_set(spec, size_hint, with_test=False, cache_dir=cache_dir)
    indices = _class_indices(data, spec.source_classes, "source_classes")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c, given in zip(indices, spec.source_classes, strict=True):
        idx = rng.permutation(np.flatnonzero(data.pool.y == c))
        if len(idx) < 2:
            raise DataError(
                f"data: source class {given} of {data.where} has {len(idx)} images; "
                "the source task needs at least 2 (train and val)"
            )
        n_val = max(1, round(val_fraction * len(idx)))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    parts = [
        ("train", data.pool, np.sort(np.concatenate(train))),
        ("val", data.pool, np.sort(np.concatenate(val))),
    ]
    return _task(data, spec, spec.source_classes, indices, parts)
