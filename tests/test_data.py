"""Tests of harness.data.datasets on tiny data sets written in the real on-disk formats.

CIFAR-10/100 as Python 2 pickles (what the official archives hold), MNIST and FashionMNIST as
big-endian idx files, and image folders of PNGs: each is read through torchvision's own classes
or PIL, exactly as a user's data is. Only torchvision's md5 check of the CIFAR files is patched
(the files are not the official ones); nothing touches the network.
"""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd

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


# --- imagefolder -------------------------------------------------------------------------------
