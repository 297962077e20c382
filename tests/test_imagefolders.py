"""Image folders in the real on-disk format (PNG/JPEG class subfolders, flat or split into
train/val/test, corrupt and duplicate files, greyscale, sizes), and the digits' own duplicate
check."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_data import spec_of

from harness.config.spec import DataSpec
from harness.data import datasets as hdata
from harness.data import sources


@pytest.fixture(autouse=True)
def _fresh_cache():
    sources.clear_cache()
    yield
    sources.clear_cache()


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
