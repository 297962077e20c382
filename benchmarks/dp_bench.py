"""Scaling of one trial over data-parallel ranks: `ratio k2/k1`, training throughput of a trial
on 2 ranks over the same trial on 1 (`train.devices_per_trial`, harness.core.distributed).

    python benchmarks/dp_bench.py                # CPU: digits at 32 px, resnet18, threads split
    python benchmarks/dp_bench.py --device cuda  # 2 GPUs vs 1: resnet50, digits at 224 px

Run by hand, never as a timed test. Each rank gets `--per-device-batch` images of every global
batch (global batch = K x it: weak scaling, as data-parallel training is used); on the CPU the
K ranks share the same cores (each has threads / K), so the CPU figure says what the runtime
costs, not what more hardware buys. The figure is images per second over whole epochs (training,
the sharded evaluation and the per-epoch collectives), the median over the epochs after the
first; the ranks' start (spawn, imports, data) is printed apart. Prints a table, then
`ratio k2/k1 X` and a `device ...` line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.config.spec import TrialConfig  # noqa: E402
from harness.core import shared, tasks


class _Marks:
    def __init__(self):
        self.marks = [time.perf_counter()]

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.marks.append(time.perf_counter())


def trial(k: int, device: str, arch: str, size: int, per_device: int, epochs: int, threads: int):  # noqa: E501
    """(images per second in steady state, seconds before the first epoch started)."""
    config = TrialConfig.model_validate(
        {
            "name": "dp-bench",
            "data": {"dataset": "digits", "shots_per_class": 140, "image_size": size},
            "model": {"arch": arch, "pretrained": "none"},
            "train": {
                "epochs": epochs,
                "batch_size": per_device * k,
                "device": device,
                "threads": max(1, threads // k) if device == "cpu" else None,
                "devices_per_trial": k,
                "lr": 0.01,
            },
        }
    )
    data = tasks.load_data(config)
    shared.seed_everything(config.seed)
    model = tasks.build(config, data, None)
    marks = _Marks()  # from before the ranks start
    tasks.train(config, model, data, [marks])
    spans = [b - a for a, b in zip(marks.marks[1:], marks.marks[2:], strict=False)]
    setup = marks.marks[1] - marks.marks[0] - statistics.median(spans)  # start, less an epoch
    images = shared.steps_per_epoch(len(data.x_train), config.train.batch_size, 2 * k)
    images *= config.train.batch_size  # every step a full global batch (the tail is skipped)
    return images / statistics.median(spans), max(setup, 0.0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--epochs", type=int, default=6, help="epochs per trial (the first warms up)")
    p.add_argument("--per-device-batch", type=int, help="default: CPU 64, CUDA 128")
    p.add_argument(
        "--threads-per-rank",
        type=int,
        help="CPU: each rank's threads (K=2 then uses twice the cores of K=1, as 2 GPUs are "
        "twice one); default: the process's threads split over the ranks",
    )
    p.add_argument(
        "--same-global-batch",
        action="store_true",
        help="K=1 trains on the global batch of K=2 (2 x per device): strong scaling",
    )
    args = p.parse_args()
    cuda = args.device == "cuda"
    arch, size = ("resnet50", 224) if cuda else ("resnet18", 32)
    per_device = args.per_device_batch or (128 if cuda else 64)
    threads = torch.get_num_threads()
    rows = {}
    for k in (1, 2):
        per = per_device * 2 if args.same_global_batch and k == 1 else per_device
        total = threads if args.threads_per_rank is None else args.threads_per_rank * k
        rows[k] = trial(k, args.device, arch, size, per, args.epochs, total)
    scaling = "same global batch" if args.same_global_batch else f"{per_device} per device"
    if args.threads_per_rank is not None:
        scaling += f", {args.threads_per_rank} threads per rank"
    print(f"{'K':>2} {'img/s':>9} {'start s':>8}   ({arch} {size}px, {scaling})")
    for k, (ips, setup) in rows.items():
        print(f"{k:>2} {ips:>9.1f} {setup:>8.1f}")
    print(f"ratio k2/k1 {rows[2][0] / rows[1][0]:.3f}")
    gpu = torch.cuda.get_device_name() if cuda else "none"
    print(
        f"device {args.device} (gpu {gpu}), torch {torch.__version__}, {threads} threads, "
        f"{len(os.sched_getaffinity(0))} cores"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
