"""The decoded-folder cache (harness.data.datacache): decoded once per machine, memory-mapped,
rebuilt when corrupt or stale, the same pixels serial or parallel, cached or not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.config.spec import DataSpec
from harness.data import datacache, sources
from harness.data import datasets as hdata
from harness.data.stream import HostImages

REPO = Path(__file__).resolve().parent.parent


def make_folder(root: Path, counts: dict[str, int], size=(12, 10), seed=0, jpeg=False):
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.{'jpg' if jpeg else 'png'}")


def spec_of(root: Path, **extra) -> DataSpec:
    base = {
        "dataset": "imagefolder",
        "root": str(root),
        "source_classes": ["c"],
        "target_classes": ["a", "b"],
        "shots_per_class": 2,
        "val_per_class": 1,
        "image_size": 8,
    }
    return DataSpec.model_validate({**base, **extra})


def decodes(cache: Path) -> list[str]:
    log = cache / datacache.LOG
    return log.read_text().splitlines() if log.is_file() else []


def listing(root: Path, size: int):
    names, files = sources._listing(root)
    import hashlib

    stamp = hashlib.sha256()
    for split, entries in files.items():
        for path, label in entries:
            st = path.stat()
            stamp.update(f"{split}|{path}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return files, stamp.hexdigest()


def same_task(a: hdata.TaskData, b: hdata.TaskData) -> None:
    for part in ("train", "val", "test"):
        for v in "xy":
            got, want = getattr(a, f"{v}_{part}"), getattr(b, f"{v}_{part}")
            got = got.resident() if isinstance(got, HostImages) else got
            assert torch.equal(got, want), f"{v}_{part}"
    assert (a.data_hash, a.mean, a.std, a.report) == (b.data_hash, b.mean, b.std, b.report)


@pytest.fixture(autouse=True)
def _fresh():
    sources.clear_cache()
    yield
    sources.clear_cache()


def test_cached_load_equals_the_uncached_one_then_hits(tmp_path):
    root, cache = tmp_path / "ds", tmp_path / "results" / "cache" / "data"
    make_folder(root / "train", {"a": 5, "b": 5, "c": 4}, seed=1)
    make_folder(root / "test", {"a": 2, "b": 2}, seed=2)
    (root / "train" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is no png")
    spec = spec_of(root)
    plain = hdata.load_target(spec, 0)
    src_plain = hdata.load_source(spec, 0)
    sources.clear_cache()
    cached = hdata.load_target(spec, 0, cache_dir=cache)
    same_task(cached, plain)
    assert cached.report.skipped_paths == (str(root / "train" / "a" / "broken.png"),)
    same_task(hdata.load_source(spec, 0, cache_dir=cache), src_plain)
    assert len(decodes(cache)) == 1 and "1 skipped" in decodes(cache)[0]
    (npy,) = cache.glob("*.npy")
    meta = json.loads(npy.with_suffix(".json").read_text())
    assert meta["splits"]["train"]["skipped"][0][0].endswith("broken.png")
    assert len(meta["splits"]["train"]["hashes"]) == 14 and meta["mode"] == "RGB"
    # a hit: another load (the process cache forgotten) maps the file, decodes nothing
    sources.clear_cache()
    again = hdata.load_target(spec, 0, cache_dir=cache)
    same_task(again, plain)
    assert len(decodes(cache)) == 1
    assert not list(cache.glob(".*"))  # no temporary file left behind
    # a miss: another size is another key
    sources.clear_cache()
    other = hdata.load_target(spec.model_copy(update={"image_size": 10}), 0, cache_dir=cache)
    assert other.x_train.shape[-1] == 10 and len(decodes(cache)) == 2
    assert len(list(cache.glob("*.npy"))) == 2


def test_mapped_not_read(tmp_path):
    """The cache is memory-mapped read-only: loading it reads no pixels into memory."""
    root, cache = tmp_path / "f", tmp_path / "cache"
    make_folder(root, {"a": 3, "b": 3, "c": 3})
    files, stamp = listing(root, 8)
    first = datacache.folder(cache, root, files, stamp, 8)
    second = datacache.folder(cache, root, files, stamp, 8)
    assert first.built_now and not second.built_now
    assert isinstance(second.x, np.memmap) and second.x.mode == "r"
    np.testing.assert_array_equal(first.x, second.x)


def test_parallel_decode_gives_the_serial_pixels(tmp_path):
    root = tmp_path / "f"
    make_folder(root, {"a": 40, "b": 40}, size=(31, 23), jpeg=True)
    (root / "a" / "bad.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    paths = sources._image_files(root)
    serial, r1, h1 = datacache.decode(paths, "RGB", 16, tmp_path / "s.npy", workers=1)
    parallel, r2, h2 = datacache.decode(paths, "RGB", 16, tmp_path / "p.npy", workers=2)
    assert len(paths) > 2 * datacache.CHUNK and r1 == r2
    assert sum(not ok for ok, _ in r1) == 1
    np.testing.assert_array_equal(serial, parallel)
    np.testing.assert_array_equal(h1, h2)
    # the statistics from the workers' histograms are those of the pixels
    ok = [i for i, (good, _) in enumerate(r1) if good]
    assert datacache.stats_of_histogram(h2) == datacache.pixel_stats(np.asarray(serial)[ok])
    # and the pixels are those of the per-image reader of the uncached path
    i = 5
    pixels, digest = datacache.read_image(paths[i], "RGB", 16)
    np.testing.assert_array_equal(parallel[i], pixels)
    assert r2[i] == (True, digest)


@pytest.mark.parametrize(
    "damage",
    ["truncated", "pixels", "json", "version", "npy_header", "json_missing"],
)
def test_a_corrupt_or_other_version_cache_is_rebuilt(tmp_path, damage):
    root, cache = tmp_path / "f", tmp_path / "cache"
    make_folder(root, {"a": 4, "b": 4, "c": 4})
    files, stamp = listing(root, 8)
    good = np.array(datacache.folder(cache, root, files, stamp, 8).x)
    (npy,) = cache.glob("*.npy")
    meta_path = npy.with_suffix(".json")
    if damage == "truncated":
        with open(npy, "r+b") as f:
            f.truncate(npy.stat().st_size - 100)
    elif damage == "pixels":  # the first row is always sampled
        x = np.load(npy, mmap_mode="r+")
        x[0] = 255 - x[0]
        x.flush()
        del x
    elif damage == "json":
        meta_path.write_text("{not json")
    elif damage == "version":
        meta = json.loads(meta_path.read_text())
        meta["version"] = datacache.FORMAT_VERSION + 1
        meta_path.write_text(json.dumps(meta))
    elif damage == "npy_header":
        with open(npy, "r+b") as f:
            f.write(b"garbage!")
    else:
        meta_path.unlink()
    rebuilt = datacache.folder(cache, root, files, stamp, 8)
    assert rebuilt.built_now
    np.testing.assert_array_equal(rebuilt.x, good)
    lines = decodes(cache)
    assert len(lines) == 2
    if damage != "json_missing":
        assert "replaced a cache file" in lines[1]
    assert not datacache.folder(cache, root, files, stamp, 8).built_now


def test_a_changed_folder_gets_a_new_key(tmp_path):
    root, cache = tmp_path / "f", tmp_path / "cache"
    make_folder(root, {"a": 4, "b": 4, "c": 4})
    spec = spec_of(root)
    before = hdata.load_target(spec, 0, cache_dir=cache)
    (old,) = cache.glob("*.npy")
    path = root / "b" / "002.png"
    Image.fromarray(np.full((10, 12, 3), 7, np.uint8)).save(path)
    os.utime(path, ns=(0, 10**9))
    after = hdata.load_target(spec, 0, cache_dir=cache)
    (new,) = cache.glob("*.npy")  # the stale cache of the same folder is removed
    assert new != old and len(decodes(cache)) == 2
    assert after.data_hash != before.data_hash
    sources.clear_cache()
    same_task(after, hdata.load_target(spec, 0))


CHILD = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from harness.data import datacache
    from harness.data.sources import _listing
    import hashlib
    root, cache, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    names, files = _listing(root)
    stamp = hashlib.sha256()
    for split, entries in files.items():
        for path, label in entries:
            st = path.stat()
            stamp.update(f"{{split}}|{{path}}|{{label}}|{{st.st_size}}|{{st.st_mtime_ns}}\\n".encode())
    (go.parent / f"ready-{{os.getpid()}}").touch()  # imported and listed: waiting for the go
    while not go.exists():
        time.sleep(0.005)
    d = datacache.folder(cache, root, files, stamp.hexdigest(), 24, workers=1)
    print(d.built_now, d.key, int(d.x.sum()))
    """
)


def test_concurrent_first_loads_decode_once(tmp_path):
    """Two processes that miss the cache at the same moment: one decodes, the other waits on
    the lock and maps what the first wrote."""
    root, cache, go = tmp_path / "f", tmp_path / "cache", tmp_path / "go"
    make_folder(root, {"a": 60, "b": 60, "c": 10}, size=(64, 48), jpeg=True)
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(repo=str(REPO)))
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(root), str(cache), str(go)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    import time

    while len(list(tmp_path.glob("ready-*"))) < 2:  # both imported, both waiting
        assert all(p.poll() is None for p in procs), "a child process ended early"
        time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(o[0] for o in outs) == ["False", "True"]  # one decoded, one mapped
    assert outs[0][1:] == outs[1][1:]
    assert len(decodes(cache)) == 1


def test_datacache_imports_no_torch_optuna_or_mlflow():
    """The decode pool's workers import this module: it stays light."""
    code = (
        "import sys\n"
        "import harness.data.datacache\n"
        "heavy = ('optuna', 'mlflow', 'torch')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_two_workers_on_one_folder_decode_it_once(tmp_path):
    """`--workers 2`: the spawning process decodes the folder into RESULTS/cache/data before
    the workers start (and pretrains the source model from the same cache); the workers and
    the source pretraining map it: one decode in all."""
    root, results = tmp_path / "pets", tmp_path / "results"
    make_folder(root, {"a": 14, "b": 14, "c": 14, "d": 14}, size=(20, 16))
    sets = [
        "data.dataset=imagefolder",
        f"data.root={root}",
        "data.source_classes=[c, d]",
        "data.target_classes=[a, b]",
        "data.shots_per_class=4",
        "data.val_per_class=4",
        "data.image_size=16",
        "model.source_epochs=1",
        "train.epochs=1",
        "search.pruner=none",
    ]
    args = [str(REPO / "experiments" / "quickstart.yaml"), "--results", str(results)]
    args += ["--n-trials", "2", "--workers", "2", "--quiet"]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(
        [sys.executable, str(REPO / "run_study.py"), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    lines = decodes(results / "cache" / "data")
    assert len(lines) == 1, lines
    assert "decoded 56 images" in lines[0]
    logs = sorted((results / "logs" / "quickstart").glob("worker-*.log"))
    assert len(logs) == 2


def test_parallel_build_with_an_unreadable_file_equals_the_uncached_load(tmp_path):
    root, cache = tmp_path / "f", tmp_path / "cache"
    make_folder(root, {"a": 30, "b": 30, "c": 10}, jpeg=True)
    (root / "a" / "015.jpg").write_bytes(b"\xff\xd8\xff truncated")
    spec = spec_of(root, shots_per_class=5, val_per_class=3)
    plain = hdata.load_target(spec, 0)
    sources.clear_cache()
    names, files = sources._listing(root)
    _, stamp = listing(root, 8)
    built = datacache.folder(cache, root, files, stamp, 8, workers=2)
    assert built.built_now and "2 worker(s)" in decodes(cache)[0]
    assert built.x.shape[0] == 69  # the unreadable file's row compacted away
    same_task(hdata.load_target(spec, 0, cache_dir=cache), plain)


# --- data.cache_size: crop from more pixels than the network sees --------------------------------
def test_cache_size_keeps_a_larger_side_and_evaluation_takes_its_center(tmp_path):
    """The folder is decoded at cache_size; the model resizes a training batch whole (after its
    random-resized crop) and, in eval mode, takes the center image_size/cache_size first."""
    import torch.nn.functional as F

    from harness.config.spec import TrialConfig
    from harness.core import tasks

    root = tmp_path / "pets"
    make_folder(root, {"a": 6, "b": 6, "c": 6}, size=(40, 30))
    data_keys = spec_of(root, image_size=16, cache_size=24).model_dump()
    config = TrialConfig.model_validate(
        {
            "name": "t",
            "data": data_keys,
            "model": {"pretrained": "none", "width": 8},
            "train": {"device": "cpu"},
            "aug": {"policy": "random_resized_crop_flip"},
        }
    )
    task = hdata.load_target(config.data, 0, cache_dir=tmp_path / "cache")
    assert task.image_size == 24  # the cached side
    model = tasks.build(config, task)
    assert model.prep.size == 16 and model.prep.eval_crop == pytest.approx(16 / 24)
    x = task.x_val[:3] if isinstance(task.x_val, torch.Tensor) else task.x_val[:3]
    model.eval()
    center = x[..., 4:20, 4:20].float() / 255.0  # the center 16 of 24, then no resize
    expected = (center - model.prep.mean) / model.prep.std
    torch.testing.assert_close(model.prep(x), expected)
    model.train()
    whole = F.interpolate(x.float() / 255.0, size=(16, 16), mode="bilinear", antialias=True)
    torch.testing.assert_close(model.prep(x), (whole - model.prep.mean) / model.prep.std)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"image_size": 16, "cache_size": 12}, "cache_size: 12 needs an image_size at most"),
        ({"image_size": None, "cache_size": 32}, "needs an image_size"),
        ({"dataset": "digits", "cache_size": 32}, "for imagefolder data only"),
    ],
)
def test_cache_size_is_checked(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        spec_of(tmp_path, **extra)
