"""Data sets, seeded stratified splits, and the data checks.

Small data sets live as uint8 image tensors (N, C, H, W) on the training device
(`TaskData.to`), so the training loop indexes them directly: no DataLoader, no per-image host
work. Conversion to float, resizing and normalization happen per batch on the device, inside
the model (`harness.core.models.Preprocess`), with the statistics each data set declares here.

Data sets: scikit-learn's bundled `digits`; torchvision's `cifar10`, `cifar100`, `mnist` and
`fashionmnist`, read by torchvision's own classes from `data.root` at native resolution
(downloaded there only when `data.download` is true); and `imagefolder`, a folder of class
subfolders of images, resized to one square size at load. Each is decoded once per process
(`_CACHE`), since every trial calls `load_target`; given a `cache_dir` (the study passes
RESULTS/cache/data), an image folder is decoded once per machine, in parallel, into a cache
that every later process memory-maps (`harness.data.datacache`), and its train split reaches the
device all at once or, when larger than `data.device_budget_gb`, batch by batch
(`harness.data.stream`). Every task is checked: unreadable images
are skipped and reported, and exact duplicate images across train/val/test (leakage) are an
error unless `data.allow_duplicates`; `TaskData.report` says what was found.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from harness.data import datacache
from harness.data.datacache import GREY_MODES  # noqa: F401 - where it used to be
from harness.data.datacache import colour_mode as _colour_mode
from harness.data.datacache import content_hash as _content_hash
from harness.data.datacache import pixel_stats as _pixel_stats
from harness.data.datacache import read_image as _read_image
from harness.config.spec import DataSpec
from harness.data.stream import HostImages
from harness.data.taskdata import DataReport, TaskData

# Digits pixels are 0..16, stored as uint8 0..255; mean and std of all 1,797 images in [0, 1].
DIGITS_MEAN, DIGITS_STD = (0.3053,), (0.3759,)
# Per-channel mean and std in [0, 1] of each fixed data set's train split (published values).
STATS = {
    "digits": (DIGITS_MEAN, DIGITS_STD),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashionmnist": ((0.2860,), (0.3530,)),
}
# data.dataset -> the torchvision.datasets class that reads it
TORCHVISION = {
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
    "mnist": "MNIST",
    "fashionmnist": "FashionMNIST",
}
DEFAULT_IMAGE_SIZE = 224  # imagefolder side without data.image_size or a size hint
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff")
VAL_FRACTION = 0.1  # of each source class, held out as the source task's val split
SHOW = 5  # examples named in a message


class DataError(ValueError):
    """The data cannot serve the experiment as written (names the key and the numbers)."""


# --- Decoded data sets, cached per process. ---
@dataclass(frozen=True)
class _Split:
    """One decoded split of a data set: every image, its class index, its content hash."""

    x: np.ndarray  # uint8 (N, C, H, W)
    y: np.ndarray  # int64 (N,), index into `names`
    names: tuple[str, ...]  # class names, by index
    hashes: tuple[str, ...]  # content hash of each image (decoded pixels at native size)
    what: str  # how a message names an image of this split: "cifar10 train image 12"
    files: tuple[str, ...] = ()  # imagefolder: each image's path relative to data.root
    skipped: tuple[tuple[str, str], ...] = ()  # imagefolder: (path, why) of unreadable files

    def name_of(self, i: int) -> str:
        return self.files[i] if self.files else f"{self.what} image {i}"


@dataclass(frozen=True)
class _Data:
    """A data set as the splitter sees it."""

    dataset: str
    where: str  # for messages: "digits", "cifar10 in /data", "imagefolder /data/pets"
    pool: _Split  # the train split: target train and val, and the whole source task
    val: _Split | None  # imagefolder's val/ folder (else val comes from the pool)
    test: _Split | None  # the official test split or test/ folder (else: the pool's rest)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    extra_hash: tuple[str, ...] = ()  # what data_hash covers beyond indices (imagefolder)

    @property
    def skipped(self) -> tuple[tuple[str, str], ...]:
        parts = (self.pool, self.val, self.test)
        return tuple(s for part in parts if part is not None for s in part.skipped)


_CACHE: dict[tuple, object] = {}


def clear_cache() -> None:
    """Forget every decoded data set (the next load reads the files again)."""
    _CACHE.clear()


def _hashes(x: np.ndarray) -> tuple[str, ...]:
    return tuple(_content_hash(img.tobytes()) for img in x)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    bunch = load_digits()
    x = np.round(bunch.images[:, None] / 16.0 * 255.0).astype(np.uint8)  # (N, 1, 8, 8)
    return x, bunch.target.astype(np.int64)


def _digits_data() -> _Data:
    key = ("digits",)
    if key not in _CACHE:
        x, y = _digits()
        names = tuple(str(c) for c in range(10))
        _CACHE[key] = _Split(x, y, names, _hashes(x), "digits")
    mean, std = STATS["digits"]
    return _Data("digits", "digits", _CACHE[key], None, None, mean, std)


# --- torchvision data sets: read by torchvision's own classes from data.root. ---
def _expected_files(cls) -> list[str]:
    """The files under data.root that torchvision's class `cls` reads."""
    if hasattr(cls, "base_folder"):  # CIFAR10, CIFAR100
        names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return [f"{cls.base_folder}/{name}" for name in names]
    return [  # MNIST and its kin: the unpacked idx files under <ClassName>/raw/
        f"{cls.__name__}/raw/{os.path.splitext(os.path.basename(url))[0]}"
        for url, _ in cls.resources
    ]


def _not_found(dataset: str, cls, root: str, download: bool, err: Exception) -> str:
    expected = _expected_files(cls)
    folder = expected[0].rsplit("/", 1)[0] + "/"
    missing = [f for f in expected if not (Path(root) / f).is_file()]
    at = f"data.root {root!r} ({os.path.abspath(root)})"
    files = ", ".join(f.rsplit("/", 1)[1] for f in expected)
    head = (
        f"data: {dataset} is not in {at}: torchvision's {cls.__name__} expects the folder "
        f"{folder} there, holding {files}"
    )
    if not (Path(root) / folder).is_dir():
        found = f"; there is no {folder} there"
    elif missing:
        found = f"; missing: {', '.join(missing[:SHOW])}" + (
            f" and {len(missing) - SHOW} more" if len(missing) > SHOW else ""
        )
    else:
        found = f"; the files are there but torchvision refused them ({err})"
    if download:
        return (
            f"{head}{found}. Downloading it (data.download: true) failed: {err}. Check the "
            f"network, or download {dataset} elsewhere and copy {folder} into data.root"
        )
    return (
        f"{head}{found}. Set data.download: true to download it into data.root (needs the "
        f"network), or copy {folder} there"
    )


def _torchvision_split(dataset: str, root: str, train: bool, download: bool) -> _Split:
    part = "train" if train else "test"
    key = (dataset, os.path.abspath(root), part)
    if key in _CACHE:
        return _CACHE[key]
    import torchvision.datasets as tvd

    cls = getattr(tvd, TORCHVISION[dataset])
    try:
        ds = cls(root, train=train, download=download)
    except Exception as err:  # missing or corrupt files, or no network: one message, one fix
        raise DataError(_not_found(dataset, cls, root, download, err)) from err
    x = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # (N, H, W[, C]) -> (N, C, H, W)
    x = np.ascontiguousarray(x, dtype=np.uint8)
    targets = ds.targets
    y = targets.numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets)
    split = _Split(x, y.astype(np.int64), tuple(ds.classes), _hashes(x), f"{dataset} {part}")
    _CACHE[key] = split
    return split


def _torchvision_data(spec: DataSpec, with_test: bool) -> _Data:
    pool = _torchvision_split(spec.dataset, spec.root, True, spec.download)
    test = _torchvision_split(spec.dataset, spec.root, False, spec.download) if with_test else None
    mean, std = STATS[spec.dataset]
    where = f"{spec.dataset} in {spec.root}"
    return _Data(spec.dataset, where, pool, None, test, mean, std)


# --- imagefolder: class subfolders of images, resized to one square size at load. ---
def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.is_file()
    )


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _listing(root: Path) -> tuple[tuple[str, ...], dict[str, list[tuple[Path, int]]]]:
    """The class names (sorted folder names) and, per split folder, (file, class index)."""
    if not root.is_dir():
        raise DataError(
            f"data.root: {str(root)!r} ({root.resolve()}) is not a folder; imagefolder reads "
            "class subfolders of images there (root/CLASS/*.png), or root/train/CLASS/... with "
            "optional root/val/ and root/test/"
        )
    split_layout = (root / "train").is_dir()
    layout = {"train": root / "train"} if split_layout else {"all": root}
    if split_layout:
        layout.update({s: root / s for s in ("val", "test") if (root / s).is_dir()})
    first = layout["train" if split_layout else "all"]
    names = tuple(p.name for p in _class_folders(first))
    if not names:
        raise DataError(f"data.root: {first} holds no class subfolders of images")
    files: dict[str, list[tuple[Path, int]]] = {}
    for split, folder in layout.items():
        files[split] = [
            (path, names.index(cls.name))
            for cls in _class_folders(folder)
            if cls.name in names  # a val/ or test/ class unknown to train/ is not used
            for path in _image_files(cls)
        ]
    return names, files


def _read_split(
    root: Path, split: str, entries: list[tuple[Path, int]], names, mode: str, size: int
) -> _Split:
    images, labels, hashes, files, skipped = [], [], [], [], []
    for path, label in entries:
        try:
            pixels, digest = _read_image(path, mode, size)
        except Exception as err:  # corrupt, truncated, not an image: reported and skipped
            skipped.append((str(path), f"{type(err).__name__}: {err}"))
            continue
        images.append(pixels)
        labels.append(label)
        hashes.append(digest)
        files.append(path.relative_to(root).as_posix())
    channels = 1 if mode == "L" else 3
    x = np.stack(images) if images else np.zeros((0, channels, size, size), np.uint8)
    what = f"imagefolder {split}"
    y = np.asarray(labels, dtype=np.int64)
    return _Split(x, y, names, tuple(hashes), what, tuple(files), tuple(skipped))


def _cached_splits(cache_dir: Path, root: Path, names, files, stamp: str, size: int):
    """The splits from the decoded cache under `cache_dir` (`harness.data.datacache`): mapped."""
    decoded = datacache.folder(cache_dir, root, files, stamp, size)
    splits = {}
    for s, rec in decoded.splits.items():
        splits[s] = _Split(
            decoded.split(s),
            np.asarray(rec["labels"], dtype=np.int64),
            names,
            tuple(rec["hashes"]),
            f"imagefolder {s}",
            tuple(rec["files"]),
            tuple((path, why) for path, why in rec["skipped"]),
        )
    return splits, decoded.mode, (decoded.mean, decoded.std)


def _folder_data(spec: DataSpec, size: int, cache_dir: Path | None = None) -> _Data:
    root = Path(spec.root)
    names, files = _listing(root)
    stamp = hashlib.sha256()
    for split, entries in files.items():
        for path, label in entries:
            st = path.stat()
            stamp.update(f"{split}|{path}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    key = ("imagefolder", str(root.resolve()), size, stamp.hexdigest(), cache_dir is not None)
    if key not in _CACHE:
        for old in [k for k in _CACHE if k[:3] == key[:3]]:  # the same folder, since changed
            del _CACHE[old]
        if cache_dir is not None:  # decoded once per machine, memory-mapped
            splits, mode, stats = _cached_splits(
                Path(cache_dir), root, names, files, stamp.hexdigest(), size
            )
        else:
            mode = _colour_mode([p for entries in files.values() for p, _ in entries])
            splits = {s: _read_split(root, s, e, names, mode, size) for s, e in files.items()}
            stats = None
        pool = splits.get("train", splits.get("all"))
        if not len(pool.x):
            raise DataError(f"data.root: {root} holds no readable images in {list(names)}")
        # The train split's statistics (a flat folder: all of it, the pixels only, no labels).
        mean, std = stats or _pixel_stats(pool.x)
        extra = (f"size {size}", f"mode {mode}")
        where = f"imagefolder {root}"
        _CACHE[key] = _Data(
            "imagefolder", where, pool, splits.get("val"), splits.get("test"), mean, std, extra
        )
    return _CACHE[key]


def _open(
    spec: DataSpec, size_hint: int | None, with_test: bool, cache_dir: Path | None = None
) -> _Data:
    if spec.dataset == "digits":
        return _digits_data()
    if spec.dataset in TORCHVISION:
        return _torchvision_data(spec, with_test)
    if spec.dataset == "imagefolder":
        size = spec.cache_size or spec.image_size or size_hint or DEFAULT_IMAGE_SIZE
        return _folder_data(spec, size, cache_dir)
    raise DataError(f"data.dataset: unknown data set {spec.dataset!r}")


# --- Splits. ---
def _class_indices(data: _Data, given: tuple[int | str, ...], key: str) -> list[int]:
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


def _duplicates(parts: list[tuple[str, _Split, np.ndarray]]) -> tuple[int, list[str]]:
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
    data: _Data,
    spec: DataSpec,
    given: tuple[int | str, ...],
    indices: list[int],
    parts: list[tuple[str, _Split, np.ndarray]],
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


def _too_few(data: _Data, given, n: int, spec: DataSpec, test_from_pool: bool) -> DataError:
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
    data = _open(spec, size_hint, with_test=True, cache_dir=cache_dir)
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
    data = _open(spec, size_hint, with_test=False, cache_dir=cache_dir)
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
