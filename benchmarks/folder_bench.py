"""An image folder at scale: the first decode serial vs parallel, a second process on the cache.

    python benchmarks/folder_bench.py                 # 4,000 synthetic JPEGs 320x240, 224 px
    python benchmarks/folder_bench.py --n 1000        # smaller
    python benchmarks/folder_bench.py --n 1000 --no-serial   # skip today's (slow) path

Run by hand, never as a timed test. Makes a folder of N synthetic photo-like JPEGs (10
classes) in a temporary folder (or --dir), then times, each in a fresh process (imports not
counted):

1. today's way: the process decodes the folder itself, serially (`data.load_target` with no
   cache folder); its seconds and peak RSS;
2. the first load with the cache: decoded in parallel by a process pool into
   RESULTS/cache/data (`harness.data.datacache`), written, mapped;
3. a second process on the warm cache: the seconds to open the folder's data and to build a
   target task, and how much its RSS grew.

and, in this process, training throughput of `fit` (a small CNN on the CPU, `--shots` train
images per class at `--train-size` px, `--epochs` epochs) on the train split held all in
memory (resident) against the same split streamed batch by batch from the memory-mapped cache
(`harness.data.stream`, forced by a tiny `data.device_budget_gb`). Prints one line per figure:
`first_load_serial_s X`, `first_load_parallel_s X`, `ratio decode_parallel/serial X`,
`second_open_s X`, `second_load_target_s X`, `second_rss_growth_mb X`, `data_mb X`,
`ratio stream/resident X`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_folder(root: Path, n: int, width: int, height: int, classes: int = 10) -> None:
    """N photo-like JPEGs: smooth colour fields (a few random points upsampled) plus noise."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        img = np.asarray(low.resize((width, height), Image.Resampling.BICUBIC), np.int16)
        img = img + rng.integers(-12, 13, img.shape, dtype=np.int16)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
            folder / f"{i:05d}.jpg", quality=90
        )


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def spec_for(root: Path, size: int, classes: int = 10):
    """20 shots and 30 val images per class (fewer for a small folder), the rest for test."""
    from harness.config.spec import DataSpec

    names = [f"class{i:02d}" for i in range(classes)]
    per_class = len(list((root / names[0]).iterdir()))
    return DataSpec.model_validate(
        {
            "dataset": "imagefolder",
            "root": str(root),
            "source_classes": names[:2],
            "target_classes": names[2:],
            "shots_per_class": min(20, per_class // 4),
            "val_per_class": min(30, per_class // 4),
            "image_size": size,
        }
    )


def child(mode: str, root: Path, size: int, cache: Path) -> dict:
    """One fresh process's measurement (imports done before the clock starts)."""
    import torch  # noqa: F401 - imported before timing, as in a trial process

    from harness.data import datasets as hdata
    from harness.data import sources

    spec = spec_for(root, size)
    before = rss_mb()
    started = time.perf_counter()
    if mode == "serial":  # today's way: this process decodes the folder, one image at a time
        hdata.load_target(spec, 0)
        return {"seconds": time.perf_counter() - started, "peak_rss_mb": peak_mb()}
    if mode == "parallel":
        hdata.load_target(spec, 0, cache_dir=cache)
        return {"seconds": time.perf_counter() - started, "peak_rss_mb": peak_mb()}
    # second: a warm cache
    data = sources.open_set(spec, None, with_test=True, cache_dir=cache)
    opened = time.perf_counter() - started
    grown_open = rss_mb() - before
    task = hdata.load_target(spec, 0, cache_dir=cache)
    return {
        "open_seconds": opened,
        "load_target_seconds": time.perf_counter() - started,
        "rss_growth_open_mb": grown_open,
        "rss_growth_mb": rss_mb() - before,
        "data_mb": data.pool.x.nbytes / 2**20,
        "task_images": len(task.x_train) + len(task.x_val) + len(task.x_test),
    }


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(mode: str, root: Path, size: int, cache: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--dir", str(root), "--size", str(size)]
        + ["--cache", str(cache)],
        capture_output=True,
        text=True,
    )
    if out.returncode:
        sys.exit(f"the {mode} process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class _Marks:
    def __init__(self) -> None:
        self.marks = [time.perf_counter()]

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        self.marks.append(time.perf_counter())


def throughput(root: Path, size: int, cache: Path, shots: int, batch: int, epochs: int):
    """Training images per second of `fit` (small CNN, CPU) on the same split held all in
    memory (resident) and streamed from the memory-mapped cache: the median epoch after the
    first, of two alternating runs each."""
    import torch

    from harness.config.spec import TrialConfig
    from harness.core import finetune, models, shared
    from harness.data import datasets as hdata

    base = spec_for(root, size).model_dump()
    per_class = len(list((root / "class00").iterdir()))
    base.update(shots_per_class=min(shots, per_class - 2), val_per_class=1, eval_train_max=32)
    out = {}
    for name, budget in [("resident", None), ("stream", 1e-6)] * 2:
        config = TrialConfig.model_validate(
            {
                "name": "folder-bench",
                "data": {**base, "device_budget_gb": budget},
                "model": {"arch": "small_cnn", "width": 16, "pretrained": "none"},
                "train": {"epochs": epochs, "batch_size": batch, "device": "cpu"},
            }
        )
        task = hdata.load_target(config.data, 0, cache_dir=cache)
        shared.seed_everything(0)
        model = models.model_for(config, task)
        marks = _Marks()
        finetune.fit(config, model, task, [marks])
        seconds = float(np.median(np.diff(marks.marks)[1:]))
        out.setdefault(name, []).append(len(task.x_train) / seconds)
    streamed = task.to("cpu").x_train
    assert not isinstance(streamed, torch.Tensor)  # the stream runs really streamed
    return float(np.median(out["resident"])), float(np.median(out["stream"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--dir", type=Path, default=None, help="the folder (made when missing)")
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--no-serial", action="store_true", help="skip today's serial decode")
    p.add_argument("--epochs", type=int, default=3, help="throughput: epochs per run (0: skip)")
    p.add_argument("--shots", type=int, default=24, help="throughput: train images per class")
    p.add_argument("--train-size", type=int, default=64, help="throughput: image side")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.dir, args.size, args.cache)))
        return
    tmp = Path(tempfile.mkdtemp(prefix="folder-bench-"))
    root = args.dir or tmp / "photos"
    try:
        if not root.is_dir():
            t = time.perf_counter()
            make_folder(root, args.n, args.width, args.height)
            t = time.perf_counter() - t
            print(f"made {args.n} JPEGs {args.width}x{args.height} in {t:.1f} s")
        cache = tmp / "results" / "cache" / "data"
        print(f"cores {len(os.sched_getaffinity(0))}, folder {root}, size {args.size}")
        serial = None
        if not args.no_serial:
            serial = run_child("serial", root, args.size, cache)
            print(f"first_load_serial_s {serial['seconds']:.2f}")
            print(f"first_load_serial_peak_rss_mb {serial['peak_rss_mb']:.0f}")
        par = run_child("parallel", root, args.size, cache)
        print(f"first_load_parallel_s {par['seconds']:.2f}")
        print(f"first_load_parallel_peak_rss_mb {par['peak_rss_mb']:.0f}")
        if serial:
            print(f"ratio decode_parallel/serial {serial['seconds'] / par['seconds']:.2f}")
        second = run_child("second", root, args.size, cache)
        print(f"second_open_s {second['open_seconds']:.3f}")
        print(f"second_load_target_s {second['load_target_seconds']:.3f}")
        print(f"second_rss_growth_open_mb {second['rss_growth_open_mb']:.0f}")
        print(f"second_rss_growth_mb {second['rss_growth_mb']:.0f}")
        print(f"data_mb {second['data_mb']:.0f}")
        if args.epochs:
            resident, streamed = throughput(
                root, args.train_size, cache, args.shots, args.batch, args.epochs
            )
            print(f"train_img_per_s resident {resident:.1f} stream {streamed:.1f}")
            print(f"ratio stream/resident {streamed / resident:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
