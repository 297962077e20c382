"""Tests of harness.data.datasets on tiny data sets written in the real on-disk formats.

CIFAR-10/100 as Python 2 pickles (what the official archives hold), MNIST and FashionMNIST as
big-endian idx files, and image folders of PNGs: each is read through torchvision's own classes
or PIL, exactly as a user's data is. Only torchvision's md5 check of the CIFAR files is patched
(the files are not the official ones); nothing touches the network.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from PIL import Image

from harness.config.spec import DataSpec
from harness.data import datasets as hdata
from harness.data import sources


@pytest.fixture(autouse=True)
def _fresh_cache():
    sources.clear_cache()
    yield
    sources.clear_cache()


def spec_of(**data) -> DataSpec:
    return DataSpec.model_validate(data)


def images_by_bytes(x: np.ndarray, y: np.ndarray) -> dict[bytes, int]:
    return {img.tobytes(): int(c) for img, c in zip(x, y, strict=True)}


def distinct_images(rng, n: int, shape: tuple[int, ...]) -> np.ndarray:
    x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    assert len({img.tobytes() for img in x}) == n
    return x


def balanced_labels(rng, classes: int, per_class: int) -> np.ndarray:
    return rng.permutation(np.repeat(np.arange(classes), per_class)).astype(np.int64)


# --- the CIFAR pickles: Python 2 `str` keys and numpy arrays, as in the official archives ----
class Py2Str(bytes):
    """A Python 2 `str`: unpickles as str with encoding='latin1' (torchvision), as bytes with
    encoding='bytes' (the b'data' of the CIFAR web page)."""


class _Global:
    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self):  # save_reduce wants a callable
        raise NotImplementedError


class _Dtype:
    def __init__(self, dtype: np.dtype):
        self.dtype = dtype


class Py2Pickler(pickle._Pickler):
    """Writes protocol 2 the way Python 2 (with numpy) wrote the CIFAR batches."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2str(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + bytes(obj))
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + bytes(obj))
        self.memoize(obj)

    def save_global_ref(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    def save_array(self, arr):
        self.save_reduce(
            _Global("numpy.core.multiarray", "_reconstruct"),
            (_Global("numpy", "ndarray"), (0,), Py2Str(b"b")),
            state=(1, arr.shape, _Dtype(arr.dtype), False, Py2Str(arr.tobytes())),
            obj=arr,
        )

    def save_dtype(self, obj):
        self.save_reduce(
            _Global("numpy", "dtype"),
            (Py2Str(obj.dtype.str[1:].encode()), False, True),
            state=(3, Py2Str(b"|"), None, None, None, -1, -1, 0),
            obj=obj,
        )

    dispatch[Py2Str] = save_py2str
    dispatch[_Global] = save_global_ref
    dispatch[np.ndarray] = save_array
    dispatch[_Dtype] = save_dtype


def write_py2_pickle(path: Path, obj: dict) -> None:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue())


def py2(mapping: dict) -> dict:
    """A dict with Python 2 str keys (and str values where they are text)."""
    out = {}
    for key, value in mapping.items():
        if isinstance(value, str):
            value = Py2Str(value.encode())
        elif isinstance(value, list) and value and isinstance(value[0], str):
            value = [Py2Str(v.encode()) for v in value]
        out[Py2Str(key.encode())] = value
    return out


def test_py2_pickle_reads_like_the_official_files(tmp_path):
    x = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072) % 251
    write_py2_pickle(tmp_path / "b", py2({"data": x, "labels": [3, 1], "batch_label": "b 1"}))
    with open(tmp_path / "b", "rb") as f:
        as_bytes = pickle.load(f, encoding="bytes")  # the CIFAR web page's reader
    assert set(as_bytes) == {b"data", b"labels", b"batch_label"}
    assert as_bytes[b"data"].dtype == np.uint8 and np.array_equal(as_bytes[b"data"], x)
    with open(tmp_path / "b", "rb") as f:
        as_str = pickle.load(f, encoding="latin1")  # torchvision's reader
    assert as_str["labels"] == [3, 1] and as_str["batch_label"] == "b 1"


def write_cifar10(root: Path, per_class_train: int, per_class_test: int, seed: int = 0):
    """cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta; returns what was written
    as (N, 3, 32, 32) arrays and labels."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    y_tr = balanced_labels(rng, 10, per_class_train)
    y_te = balanced_labels(rng, 10, per_class_test)
    x_all = distinct_images(rng, len(y_tr) + len(y_te), (3072,))
    x_tr, x_te = x_all[: len(y_tr)], x_all[len(y_tr) :]
    for b, idx in enumerate(np.array_split(np.arange(len(y_tr)), 5), start=1):
        batch = {
            "batch_label": f"training batch {b} of 5",
            "labels": y_tr[idx].tolist(),
            "data": x_tr[idx],
            "filenames": [f"img_{i}.png" for i in idx],
        }
        write_py2_pickle(folder / f"data_batch_{b}", py2(batch))
    test = {"batch_label": "testing batch 1 of 1", "labels": y_te.tolist(), "data": x_te}
    write_py2_pickle(folder / "test_batch", py2(test))
    names = ["airplane", "automobile", "bird", "cat", "deer"]
    names += ["dog", "frog", "horse", "ship", "truck"]
    meta = {"num_cases_per_batch": len(y_tr) // 5, "label_names": names, "num_vis": 3072}
    write_py2_pickle(folder / "batches.meta", py2(meta))
    shape = (-1, 3, 32, 32)
    return x_tr.reshape(shape), y_tr, x_te.reshape(shape), y_te


def write_cifar100(root: Path, per_class_train: int, per_class_test: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = []
    for name, per_class in (("train", per_class_train), ("test", per_class_test)):
        y = balanced_labels(rng, 100, per_class)
        x = distinct_images(rng, len(y), (3072,))
        entry = {
            "filenames": [f"{name}_{i}.png" for i in range(len(y))],
            "batch_label": f"{name} batch",
            "fine_labels": y.tolist(),
            "coarse_labels": (y // 5).tolist(),
            "data": x,
        }
        write_py2_pickle(folder / name, py2(entry))
        out += [x.reshape(-1, 3, 32, 32), y]
    meta = {
        "fine_label_names": [f"fine{i}" for i in range(100)],
        "coarse_label_names": [f"coarse{i}" for i in range(20)],
    }
    write_py2_pickle(folder / "meta", py2(meta))
    return tuple(out)


@pytest.fixture
def cifar_md5_ok(monkeypatch):
    """The written files are not the official ones: skip only torchvision's md5 comparison."""
    monkeypatch.setattr(tvd.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tvd.cifar, "check_integrity", lambda *args, **kwargs: True)


def check_target(task, spec, x_tr, y_tr, x_te, y_te, shots, val):
    """Shapes, dtypes, exact per-class counts, labels and pixels of a target task."""
    k = len(spec.target_classes)
    for part, n in (("train", shots), ("val", val)):
        x, y = getattr(task, f"x_{part}"), getattr(task, f"y_{part}")
        assert x.dtype == torch.uint8 and y.dtype == torch.long
        assert tuple(x.shape[1:]) == x_tr.shape[1:]
        assert torch.bincount(y, minlength=k).tolist() == [n] * k
    lookup = images_by_bytes(x_tr, y_tr)
    seen = set()
    for part in ("train", "val"):
        xs, ys = getattr(task, f"x_{part}").numpy(), getattr(task, f"y_{part}").tolist()
        for img, label in zip(xs, ys, strict=True):
            key = img.tobytes()
            assert key in lookup, "not an image of the train split as written"
            assert spec.target_classes[int(label)] == lookup[key]
            assert key not in seen
            seen.add(key)
    # test: the official test split, restricted to the target classes, in file order
    mask = np.isin(y_te, spec.target_classes)
    assert np.array_equal(task.x_test.numpy(), x_te[mask])
    expected = [spec.target_classes.index(c) for c in y_te[mask]]
    assert task.y_test.tolist() == expected
    assert task.classes == tuple(spec.target_classes)


# --- torchvision data sets ---------------------------------------------------------------------
def test_cifar10_real_format(tmp_path, cifar_md5_ok):
    x_tr, y_tr, x_te, y_te = write_cifar10(tmp_path, per_class_train=8, per_class_test=3)
    spec = spec_of(
        dataset="cifar10",
        root=str(tmp_path),
        source_classes=[0, 1, 2],
        target_classes=[5, 3, 7],
        shots_per_class=2,
        val_per_class=3,
    )
    task = hdata.load_target(spec, 0)
    check_target(task, spec, x_tr, y_tr, x_te, y_te, shots=2, val=3)
    assert task.x_test.shape == (9, 3, 32, 32)
    assert (task.channels, task.image_size) == (3, 32)
    assert (task.mean, task.std) == sources.STATS["cifar10"]
    assert task.report.duplicates == 0 and task.report.skipped == ()
    # seeded: the same seed gives the same split and hash, another seed another
    again = hdata.load_target(spec, 0)
    assert again.data_hash == task.data_hash
    assert all(
        torch.equal(getattr(again, f"{a}_{p}"), getattr(task, f"{a}_{p}"))
        for a in "xy"
        for p in ("train", "val", "test")
    )
    assert hdata.load_target(spec, 1).data_hash != task.data_hash
    more = spec.model_copy(update={"shots_per_class": 3})
    assert hdata.load_target(more, 0).data_hash != task.data_hash
    # the source task: the source classes of the train split, 10% of each class as val
    src = hdata.load_source(spec, 0)
    assert src.classes == (0, 1, 2)
    assert torch.bincount(src.y_train, minlength=3).tolist() == [7, 7, 7]
    assert torch.bincount(src.y_val, minlength=3).tolist() == [1, 1, 1]
    assert src.x_test.shape == (0, 3, 32, 32)
    lookup = images_by_bytes(x_tr, y_tr)
    for img, label in zip(src.x_train.numpy(), src.y_train.tolist(), strict=True):
        assert lookup[img.tobytes()] == label


def test_cifar10_decoded_once_per_process(tmp_path, cifar_md5_ok, monkeypatch):
    write_cifar10(tmp_path, per_class_train=4, per_class_test=1)
    spec = spec_of(dataset="cifar10", root=str(tmp_path), shots_per_class=1, val_per_class=1)
    calls = []
    original = tvd.CIFAR10.__init__

    def counting(self, *args, **kwargs):
        calls.append(kwargs.get("train"))
        original(self, *args, **kwargs)

    monkeypatch.setattr(tvd.CIFAR10, "__init__", counting)
    for seed in range(3):
        hdata.load_target(spec, seed)
    hdata.load_source(spec, 0)
    assert sorted(calls) == [False, True]


def test_cifar100_real_format(tmp_path, cifar_md5_ok):
    x_tr, y_tr, x_te, y_te = write_cifar100(tmp_path, per_class_train=3, per_class_test=2)
    spec = spec_of(
        dataset="cifar100",
        root=str(tmp_path),
        source_classes=[0, 1],
        target_classes=[99, 10, 42],
        shots_per_class=1,
        val_per_class=2,
    )
    task = hdata.load_target(spec, 0)
    check_target(task, spec, x_tr, y_tr, x_te, y_te, shots=1, val=2)
    assert len(task.x_test) == 6
    assert (task.mean, task.std) == sources.STATS["cifar100"]


def write_idx(path: Path, array: np.ndarray) -> None:
    """The idx format: magic 0x0000 08 NDIM (unsigned byte), big-endian sizes, the data."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, cls_name: str, per_class_train: int, per_class_test: int):
    rng = np.random.default_rng(2)
    raw = root / cls_name / "raw"
    raw.mkdir(parents=True)
    out = []
    for prefix, per_class in (("train", per_class_train), ("t10k", per_class_test)):
        y = balanced_labels(rng, 10, per_class)
        x = distinct_images(rng, len(y), (28, 28))
        write_idx(raw / f"{prefix}-images-idx3-ubyte", x)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y)
        out += [x[:, None], y]
    return tuple(out)


@pytest.mark.parametrize(
    ("dataset", "cls_name"), [("mnist", "MNIST"), ("fashionmnist", "FashionMNIST")]
)
def test_mnist_idx_files(tmp_path, dataset, cls_name):
    # torchvision 0.29's MNIST checks only that the unpacked files exist: nothing is patched
    x_tr, y_tr, x_te, y_te = write_mnist(tmp_path, cls_name, per_class_train=6, per_class_test=2)
    spec = spec_of(
        dataset=dataset,
        root=str(tmp_path),
        source_classes=[0, 1],
        target_classes=[4, 8],
        shots_per_class=3,
        val_per_class=2,
    )
    task = hdata.load_target(spec, 0)
    check_target(task, spec, x_tr, y_tr, x_te, y_te, shots=3, val=2)
    assert task.x_train.shape == (6, 1, 28, 28)
    assert (task.channels, task.image_size) == (1, 28)
    assert (task.mean, task.std) == sources.STATS[dataset]


@pytest.mark.parametrize(
    ("dataset", "folder"),
    [
        ("cifar10", "cifar-10-batches-py/"),
        ("cifar100", "cifar-100-python/"),
        ("mnist", "MNIST/raw/"),
        ("fashionmnist", "FashionMNIST/raw/"),
    ],
)
def test_missing_files_offline_error(tmp_path, dataset, folder):
    root = tmp_path / "no-data-here"
    spec = spec_of(dataset=dataset, root=str(root))
    with pytest.raises(sources.DataError) as err:
        hdata.load_target(spec, 0)
    message = str(err.value)
    assert str(root) in message and folder in message
    assert "data.download: true" in message
    assert not root.exists()  # nothing was downloaded or created


def test_partial_cifar_folder_names_the_missing_files(tmp_path, cifar_md5_ok):
    write_cifar10(tmp_path, per_class_train=2, per_class_test=1)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(sources.DataError) as err:
        hdata.load_target(spec_of(dataset="cifar10", root=str(tmp_path)), 0)
    message = str(err.value)
    assert "missing: cifar-10-batches-py/data_batch_3, cifar-10-batches-py/test_batch" in message
    assert "data.download: true" in message


@pytest.mark.parametrize("dataset", ["cifar10", "mnist"])
def test_download_without_network_is_a_clear_error(tmp_path, monkeypatch, dataset):
    def unreachable(*args, **kwargs):
        raise URLError("network unreachable")

    module = tvd.cifar if dataset == "cifar10" else tvd.mnist
    monkeypatch.setattr(module, "download_and_extract_archive", unreachable)
    root = tmp_path / "data"
    with pytest.raises(sources.DataError) as err:
        hdata.load_target(spec_of(dataset=dataset, root=str(root), download=True), 0)
    message = str(err.value)
    assert str(root) in message and "Downloading" in message and "failed" in message


def test_duplicates_across_splits_by_index(tmp_path, cifar_md5_ok):
    x_tr, y_tr, x_te, y_te = write_cifar10(tmp_path, per_class_train=5, per_class_test=2)
    # one test image of class 3 is an exact copy of a train image of class 3
    i_te, i_tr = int(np.flatnonzero(y_te == 3)[0]), int(np.flatnonzero(y_tr == 3)[0])
    folder = tmp_path / "cifar-10-batches-py"
    x_te[i_te] = x_tr[i_tr]
    test = {"batch_label": "t", "labels": y_te.tolist(), "data": x_te.reshape(len(x_te), -1)}
    write_py2_pickle(folder / "test_batch", py2(test))
    data = {"dataset": "cifar10", "root": str(tmp_path), "target_classes": [3, 4]}
    spec = spec_of(**data, shots_per_class=None, val_per_class=1)  # every other image trains
    with pytest.raises(sources.DataError) as err:
        hdata.load_target(spec, 0)
    message = str(err.value)
    assert "1 exact duplicate" in message and "data.allow_duplicates: true" in message
    assert f"cifar10 test image {i_te}" in message and f"cifar10 train image {i_tr}" in message
    sources.clear_cache()
    task = hdata.load_target(spec.model_copy(update={"allow_duplicates": True}), 0)
    assert task.report.duplicates == 1 and task.report.duplicates_allowed
    assert any("1 exact duplicate" in line for line in task.report.lines())


# --- digits ----------------------------------------------------------------------------------
def test_digits_has_no_exact_duplicates_and_the_default_reports_clean():
    x, _ = sources._digits()
    assert len({img.tobytes() for img in x}) == len(x)  # so the default never trips the check
    task = hdata.load_target(DataSpec(), 0)
    assert task.report == hdata.DataReport(dataset="digits")
    assert task.report.lines() == [
        "data (digits): no unreadable images, no duplicates across splits"
    ]
    moved = task.to("cpu")
    assert moved.report == task.report


# --- imagefolder -------------------------------------------------------------------------------
def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def make_folder(root: Path, counts: dict[str, int], size=(8, 8), grey=False, seed=0):
    """root/CLASS/NNN.png; returns {relative path: (H, W[, 3]) pixels}."""
    rng = np.random.default_rng(seed)
    written = {}
    for name, n in counts.items():
        for i in range(n):
            shape = (size[1], size[0]) if grey else (size[1], size[0], 3)
            pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
            write_png(root / name / f"{i:03d}.png", pixels)
            written[f"{name}/{i:03d}.png"] = pixels
    return written


def chw(pixels: np.ndarray) -> np.ndarray:
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def test_imagefolder_flat_split_per_class(tmp_path):
    root = tmp_path / "pets"
    written = make_folder(root, {"cat": 7, "dog": 7, "emu": 7})
    (root / "cat" / "notes.txt").write_text("not an image: ignored")
    spec = spec_of(
        dataset="imagefolder",
        root=str(root),
        source_classes=["emu"],
        target_classes=["dog", "cat"],
        shots_per_class=2,
        val_per_class=3,
    )
    task = hdata.load_target(spec, 0, size_hint=8)
    assert task.classes == ("dog", "cat")
    assert task.x_train.shape == (4, 3, 8, 8) and task.x_train.dtype == torch.uint8
    assert torch.bincount(task.y_train).tolist() == [2, 2]
    assert torch.bincount(task.y_val).tolist() == [3, 3]
    assert torch.bincount(task.y_test).tolist() == [2, 2]  # the rest of each class
    lookup = {chw(p).tobytes(): rel.split("/")[0] for rel, p in written.items()}
    used = []
    for part in ("train", "val", "test"):
        x, y = getattr(task, f"x_{part}"), getattr(task, f"y_{part}")
        for img, label in zip(x.numpy(), y.tolist(), strict=True):
            assert lookup[img.tobytes()] == ("dog", "cat")[label]  # pixels as written
            used.append(img.tobytes())
    assert len(set(used)) == 14
    # mean/std: of the whole folder (a flat folder has no separate train split)
    every = np.stack([chw(p) for p in written.values()]).astype(np.float64) / 255.0
    assert task.mean == pytest.approx(every.mean(axis=(0, 2, 3)), abs=1e-4)
    assert task.std == pytest.approx(every.std(axis=(0, 2, 3)), abs=1e-4)
    # test_per_class takes part of the rest
    fewer = hdata.load_target(spec.model_copy(update={"test_per_class": 1}), 0, size_hint=8)
    assert torch.bincount(fewer.y_test).tolist() == [1, 1]
    assert torch.equal(fewer.x_train, task.x_train)
    assert fewer.data_hash != task.data_hash
    # the source task by name
    src = hdata.load_source(spec, 0, size_hint=8)
    assert src.classes == ("emu",) and (len(src.x_train), len(src.x_val)) == (6, 1)
    # seeded determinism and hash
    again = hdata.load_target(spec, 0, size_hint=8)
    assert again.data_hash == task.data_hash and torch.equal(again.x_val, task.x_val)
    assert hdata.load_target(spec, 1, size_hint=8).data_hash != task.data_hash
    with pytest.raises(sources.DataError, match="shots_per_class"):
        hdata.load_target(spec.model_copy(update={"shots_per_class": 5}), 0, size_hint=8)


def test_imagefolder_class_selection_by_name_and_index(tmp_path):
    root = tmp_path / "f"
    make_folder(root, {"b_dog": 5, "a_cat": 5, "c_emu": 5})  # sorted: a_cat, b_dog, c_emu
    base = {"dataset": "imagefolder", "root": str(root), "source_classes": ["b_dog"]}
    common = {"shots_per_class": 2, "val_per_class": 1}
    by_name = hdata.load_target(spec_of(**base, target_classes=["c_emu", "a_cat"], **common), 3)
    by_index = hdata.load_target(spec_of(**base, target_classes=[2, 0], **common), 3)
    assert by_name.classes == ("c_emu", "a_cat") and by_index.classes == (2, 0)
    for part in ("train", "val", "test"):
        for a in "xy":
            assert torch.equal(getattr(by_name, f"{a}_{part}"), getattr(by_index, f"{a}_{part}"))
    assert by_name.data_hash == by_index.data_hash
    with pytest.raises(sources.DataError, match=r"'zebra' is not a class .*a_cat"):
        hdata.load_target(spec_of(**base, target_classes=["zebra", "a_cat"], **common), 0)
    with pytest.raises(sources.DataError, match="class index 7 is out of range"):
        hdata.load_target(spec_of(**base, target_classes=[7, 0], **common), 0)
    with pytest.raises(sources.DataError, match="names one class twice"):
        hdata.load_target(spec_of(**base, target_classes=["a_cat", 0], **common), 0)


def make_split_folder(root: Path) -> dict[str, dict[str, np.ndarray]]:
    """root/{train,val,test}/{a,b,c}/, a corrupt train/a/broken.png, and test/a/dup.png, an
    exact copy of train/a/000.png saved again (another file, the same pixels)."""
    written = {
        "train": make_folder(root / "train", {"a": 5, "b": 5, "c": 5}, seed=1),
        "val": make_folder(root / "val", {"a": 2, "b": 2, "c": 2}, seed=2),
        "test": make_folder(root / "test", {"a": 3, "b": 3, "c": 3}, seed=3),
    }
    (root / "train" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is no png")
    Image.fromarray(written["train"]["a/000.png"]).save(root / "test" / "a" / "dup.png")
    written["test"]["a/dup.png"] = written["train"]["a/000.png"]
    return written


def test_imagefolder_train_val_test_folders_corrupt_and_duplicates(tmp_path):
    root = tmp_path / "ds"
    written = make_split_folder(root)
    spec = spec_of(
        dataset="imagefolder",
        root=str(root),
        source_classes=["b"],
        target_classes=["c", "a"],
        shots_per_class=None,  # every readable train image of the class: 000.png is in train
        val_per_class=2,
        image_size=8,
    )
    with pytest.raises(sources.DataError) as err:
        hdata.load_target(spec, 0)
    message = str(err.value)
    assert "1 exact duplicate" in message and "data.allow_duplicates: true" in message
    assert "test/a/dup.png = train train/a/000.png" in message
    task = hdata.load_target(spec.model_copy(update={"allow_duplicates": True}), 0)
    report = task.report
    assert report.duplicates == 1 and report.duplicates_allowed
    assert report.duplicate_examples == ("test test/a/dup.png = train train/a/000.png",)
    # the corrupt file: skipped, reported with its path and why
    assert report.skipped_paths == (str(root / "train" / "a" / "broken.png"),)
    lines = report.lines()
    assert lines[0].endswith("skipped 1 unreadable image(s):")
    assert str(root / "train" / "a" / "broken.png") in lines[1]
    assert any("1 exact duplicate" in line for line in lines)
    # counts: train = every readable train image, val from val/, test = all of test/
    assert torch.bincount(task.y_train).tolist() == [5, 5]
    assert torch.bincount(task.y_val).tolist() == [2, 2]
    assert torch.bincount(task.y_test).tolist() == [3, 4]
    expected_test = [chw(written["test"][f"c/{i:03d}.png"]) for i in range(3)]
    expected_test += [chw(written["test"][f"a/{n}.png"]) for n in ("000", "001", "002", "dup")]
    got = {img.tobytes() for img in task.x_test.numpy()}
    assert got == {img.tobytes() for img in expected_test}
    val_pixels = {chw(p).tobytes() for p in written["val"].values()}
    assert all(img.tobytes() in val_pixels for img in task.x_val.numpy())
    # mean/std: from the train split (train/, every class), not from val/ or test/
    train = np.stack([chw(p) for p in written["train"].values()]).astype(np.float64) / 255
    assert task.mean == pytest.approx(train.mean(axis=(0, 2, 3)), abs=1e-4)
    # a class with too few val/ images
    with pytest.raises(sources.DataError, match="val_per_class is 3"):
        hdata.load_target(spec.model_copy(update={"val_per_class": 3}), 0)


def test_imagefolder_without_duplicates_in_the_task_loads(tmp_path):
    root = tmp_path / "ds"
    make_split_folder(root)
    spec = spec_of(
        dataset="imagefolder",
        root=str(root),
        source_classes=["a"],
        target_classes=["b", "c"],  # the duplicate is in class a
        shots_per_class=3,
        val_per_class=1,
    )
    task = hdata.load_target(spec, 0, size_hint=8)
    assert task.report.duplicates == 0 and len(task.report.skipped) == 1
    src = hdata.load_source(spec, 0, size_hint=8)
    assert len(src.x_train) + len(src.x_val) == 5  # the corrupt file is skipped


def test_imagefolder_hash_follows_file_contents(tmp_path):
    root = tmp_path / "f"
    make_folder(root, {"x": 4, "y": 4})
    spec = spec_of(
        dataset="imagefolder",
        root=str(root),
        source_classes=[0],
        target_classes=[0, 1],
        shots_per_class=None,
        val_per_class=1,
        test_per_class=1,
    )
    before = hdata.load_target(spec, 0, size_hint=8)
    path = root / "y" / "002.png"
    write_png(path, np.full((8, 8, 3), 7, np.uint8))
    os.utime(path, ns=(0, 10**9))  # a new mtime, whatever the clock's resolution
    after = hdata.load_target(spec, 0, size_hint=8)
    assert after.data_hash != before.data_hash  # same files and indices, other pixels
    assert any((img == 7).all() for img in torch.cat([after.x_train, after.x_val, after.x_test]))


def test_imagefolder_sizes(tmp_path):
    root = tmp_path / "wide"
    written = make_folder(root, {"p": 3, "q": 3}, size=(12, 8))  # 12 wide, 8 high
    data = {"dataset": "imagefolder", "root": str(root), "source_classes": ["p"]}
    spec = spec_of(**data, target_classes=["p", "q"], shots_per_class=1, val_per_class=1)
    # size_hint 8: the shorter side is 8 already, so only the center 8x8 is cropped
    task = hdata.load_target(spec, 0, size_hint=8)
    assert task.image_size == 8 and task.x_train.shape[1:] == (3, 8, 8)
    crops = {chw(p[:, 2:10]).tobytes() for p in written.values()}
    assert all(img.tobytes() in crops for img in task.x_train.numpy())
    # data.image_size wins over the hint; resized (shorter side), then center-cropped
    small = hdata.load_target(spec.model_copy(update={"image_size": 4}), 0, size_hint=8)
    assert small.x_train.shape[1:] == (3, 4, 4)
    pil = Image.fromarray(written["p/000.png"]).resize((6, 4), Image.Resampling.BILINEAR)
    reference = chw(np.asarray(pil)[:, 1:5])
    every = torch.cat([small.x_train, small.x_val, small.x_test]).numpy()
    assert any(np.array_equal(img, reference) for img in every)
    # neither: 224
    assert hdata.load_target(spec, 0).x_train.shape[1:] == (3, 224, 224)


def test_imagefolder_greyscale(tmp_path):
    root = tmp_path / "grey"
    written = make_folder(root, {"u": 4, "v": 4}, grey=True)
    data = {"dataset": "imagefolder", "root": str(root), "source_classes": ["u"]}
    spec = spec_of(**data, target_classes=["u", "v"], shots_per_class=1, val_per_class=1)
    task = hdata.load_target(spec, 0, size_hint=8)
    assert task.channels == 1 and len(task.mean) == len(task.std) == 1
    pixels = {chw(p).tobytes() for p in written.values()}
    assert all(img.tobytes() in pixels for img in task.x_test.numpy())
    # one colour image makes the whole folder RGB; the grey images get three equal channels
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    write_png(root / "v" / "colour.png", red)
    rgb = hdata.load_target(spec, 0, size_hint=8)
    assert rgb.channels == 3 and len(rgb.mean) == 3
    grey_rows = [img for img in rgb.x_train.numpy() if (img[0] == img[1]).all()]
    assert grey_rows and all((img[0] == img[2]).all() for img in grey_rows)


def test_imagefolder_missing_root(tmp_path):
    root = tmp_path / "absent"
    spec = spec_of(dataset="imagefolder", root=str(root), target_classes=["a", "b"])
    with pytest.raises(sources.DataError, match="is not a folder") as err:
        hdata.load_target(spec, 0)
    assert str(root) in str(err.value)
