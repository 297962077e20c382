"""Where a task's images come from, decoded once per process: scikit-learn's bundled digits,
torchvision's data sets read from data.root by their own classes, and image folders (class
subfolders, resized to one square size at load, decoded once per machine into the cache). Their
published statistics, and the data error."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from harness.config.spec import DataSpec
from harness.data import datacache
from harness.data.datacache import colour_mode as _colour_mode
from harness.data.datacache import content_hash as _content_hash
from harness.data.datacache import pixel_stats as _pixel_stats
from harness.data.datacache import read_image as _read_image

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


SHOW = 5  # examples named in a message


class DataError(ValueError):
    """The data cannot serve the experiment as written (names the key and the numbers)."""


@dataclass(frozen=True)
class DecodedSplit:
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
class DecodedSet:
    """A data set as the splitter sees it."""

    dataset: str
    where: str  # for messages: "digits", "cifar10 in /data", "imagefolder /data/pets"
    pool: DecodedSplit  # the train split: target train and val, and the whole source task
    val: DecodedSplit | None  # imagefolder's val/ folder (else val comes from the pool)
    test: DecodedSplit | None  # the official test split or test/ folder (else: the pool's rest)
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


def _digits_data() -> DecodedSet:
    key = ("digits",)
    if key not in _CACHE:
        x, y = _digits()
        names = tuple(str(c) for c in range(10))
        _CACHE[key] = DecodedSplit(x, y, names, _hashes(x), "digits")
    mean, std = STATS["digits"]
    return DecodedSet("digits", "digits", _CACHE[key], None, None, mean, std)


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


def _torchvision_split(dataset: str, root: str, train: bool, download: bool) -> DecodedSplit:
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
    split = DecodedSplit(x, y.astype(np.int64), tuple(ds.classes), _hashes(x), f"{dataset} {part}")
    _CACHE[key] = split
    return split


def _torchvision_data(spec: DataSpec, with_test: bool) -> DecodedSet:
    pool = _torchvision_split(spec.dataset, spec.root, True, spec.download)
    test = _torchvision_split(spec.dataset, spec.root, False, spec.download) if with_test else None
    mean, std = STATS[spec.dataset]
    where = f"{spec.dataset} in {spec.root}"
    return DecodedSet(spec.dataset, where, pool, None, test, mean, std)


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
) -> DecodedSplit:
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
    return DecodedSplit(x, y, names, tuple(hashes), what, tuple(files), tuple(skipped))


def _cached_splits(cache_dir: Path, root: Path, names, files, stamp: str, size: int):
    """The splits from the decoded cache under `cache_dir` (`harness.data.datacache`): mapped."""
    decoded = datacache.folder(cache_dir, root, files, stamp, size)
    splits = {}
    for s, rec in decoded.splits.items():
        splits[s] = DecodedSplit(
            decoded.split(s),
            np.asarray(rec["labels"], dtype=np.int64),
            names,
            tuple(rec["hashes"]),
            f"imagefolder {s}",
            tuple(rec["files"]),
            tuple((path, why) for path, why in rec["skipped"]),
        )
    return splits, decoded.mode, (decoded.mean, decoded.std)


def _folder_data(spec: DataSpec, size: int, cache_dir: Path | None = None) -> DecodedSet:
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
        _CACHE[key] = DecodedSet(
            "imagefolder", where, pool, splits.get("val"), splits.get("test"), mean, std, extra
        )
    return _CACHE[key]


def open_set(
    spec: DataSpec, size_hint: int | None, with_test: bool, cache_dir: Path | None = None
) -> DecodedSet:
    if spec.dataset == "digits":
        return _digits_data()
    if spec.dataset in TORCHVISION:
        return _torchvision_data(spec, with_test)
    if spec.dataset == "imagefolder":
        size = spec.cache_size or spec.image_size or size_hint or DEFAULT_IMAGE_SIZE
        return _folder_data(spec, size, cache_dir)
    raise DataError(f"data.dataset: unknown data set {spec.dataset!r}")
