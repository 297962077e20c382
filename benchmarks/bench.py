"""Images per second of the founding recipe's loop, the harness core and the ceiling.

    python benchmarks/bench.py --quick        # CPU: digits upscaled to 32 px, resnet18, batch 128
    python benchmarks/bench.py                # CPU batch 32 and 128; with a GPU also resnet50
    python benchmarks/bench.py --device cuda  # the GPU configurations only (224 px, b32, b256)
    python benchmarks/bench.py --quick --compile  # also the core with train.compile: true

Run by hand, never as a timed test. Everything in one run uses the same device, model, data
and batch size. Prints a readable table, then one machine-readable line per figure:
`ratio core/ceiling X`, `ratio core/recipe X`, `ratio tracked/untracked X`, `ratio eval/epoch X`
(with --quick exactly one per name), and a `device ...` line.

The core runs with the harness's defaults for the device (on CUDA: channels_last, bf16
autocast, fused SGD; on the CPU: NCHW, fp32, the single-tensor SGD); the ceiling runs the same
network (the harness's model less its uint8 preprocessing) in those same settings. Steady
state: the median over the epochs after the first (core) and over windows (ceiling).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.config.spec import TrialConfig  # noqa: E402
from harness.core import finetune, models, shared
from harness.data.datasets import TaskData  # noqa: E402


@dataclass(frozen=True)
class Setup:
    name: str
    device: str
    arch: str
    size: int  # the side the network is fed
    batch: int
    images: np.ndarray  # uint8 (N, C, H, W) at native size
    labels: np.ndarray


def digits_setup(batch: int) -> Setup:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images[:, None] / 16.0 * 255.0).astype(np.uint8)
    return Setup(f"cpu resnet18 32px b{batch}", "cpu", "resnet18", 32, batch, x, d.target)


def cifar_like_setup(batch: int) -> Setup:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (50_000, 3, 32, 32), dtype=np.uint8)
    y = rng.integers(0, 10, 50_000)
    return Setup(f"cuda resnet50 224px b{batch}", "cuda", "resnet50", 224, batch, x, y)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# --- 1. the founding recipe's loop: PIL images, per-image host transforms, .item() per step ---
def recipe(s: Setup, steps: int) -> float:
    from PIL import Image

    mode = "L" if s.images.shape[1] == 1 else "RGB"
    pil = [
        Image.fromarray(im[0] if mode == "L" else im.transpose(1, 2, 0), mode) for im in s.images
    ]
    resize = s.size if s.size < 224 else 256  # the document's Resize(256), CenterCrop(224)
    tf = transforms.Compose(
        [
            transforms.Lambda(lambda im: im.convert("RGB")),
            transforms.Resize(resize),
            transforms.CenterCrop(s.size),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(pil)

        def __getitem__(self, i):
            return tf(pil[i]), int(s.labels[i])

    loader = torch.utils.data.DataLoader(DS(), batch_size=s.batch, shuffle=True, drop_last=True)
    model = torchvision.models.get_model(s.arch, num_classes=10).to(s.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    done, timed, start = 0, 0, None
    while done < steps + 2:
        for x, y in loader:
            x, y = x.to(s.device), y.to(s.device)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            loss.item()  # the recipe's running_loss += loss.item()
            done += 1
            if done == 2:  # two warm-up steps
                start = time.perf_counter()
            elif done > 2:
                timed += len(x)
            if done >= steps + 2:
                break
    return timed / (time.perf_counter() - start)


# --- 2. the harness core: fit, its training steps timed apart from its evaluation ---
class _Timer:
    """Epoch ends (a callback) and the time fit spends in `finetune.evaluate` per epoch."""

    def __init__(self, device: str):
        self.device, self.marks, self.evals = device, [], []
        self._eval = 0.0

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        _sync(self.device)
        self.marks.append(time.perf_counter())
        self.evals.append(self._eval)
        self._eval = 0.0

    def evaluate(self, original):
        def timed(*args, **kwargs):
            _sync(self.device)
            started = time.perf_counter()
            out = original(*args, **kwargs)
            _sync(self.device)
            self._eval += time.perf_counter() - started
            return out

        return timed


def core(s: Setup, epochs: int, tracked: bool, compile: bool = False) -> tuple[float, float, float]:
    """(training images per second, evaluation share of an epoch, compile seconds) in steady
    state: the median over the epochs after the first."""
    n = len(s.images)
    n_val = max(s.batch, n // 20)
    task = TaskData(
        torch.from_numpy(s.images[n_val:]),
        torch.from_numpy(s.labels[n_val:]).long(),
        torch.from_numpy(s.images[:n_val]),
        torch.from_numpy(s.labels[:n_val]).long(),
        torch.zeros((0, *s.images.shape[1:]), dtype=torch.uint8),
        torch.zeros(0, dtype=torch.long),
        classes=tuple(range(10)),
        data_hash="bench",
        mean=(0.5,),
        std=(0.25,),
    )
    config = TrialConfig.model_validate(
        {
            "name": "bench",
            "seed": 0,
            "data": {"source_classes": [], "target_classes": list(range(10)), "image_size": s.size},
            "model": {"arch": s.arch, "pretrained": "none"},
            "train": {
                "epochs": epochs,
                "batch_size": s.batch,
                "lr": 0.001,
                "device": s.device,
                "compile": compile,
            },
        }
    )
    model = models.model_for(config, task)
    timer, callbacks = _Timer(s.device), []
    if tracked:
        from harness.tracking import store as tracking

        folder = Path(tempfile.mkdtemp(prefix="bench-"))
        client = tracking.connect(tracking.default_tracking_uri(folder))
        exp = tracking.experiment_id(client, "bench", folder, tracking.default_tracking_uri(folder))
        run = client.create_run(exp).info.run_id
        callbacks.append(tracking.EpochLogger(client, run))
    original = finetune.evaluate
    finetune.evaluate = timer.evaluate(original)
    try:
        result = finetune.fit(config, model, task, [*callbacks, timer])
    finally:
        finetune.evaluate = original
    epochs_s = np.diff(timer.marks)  # steady state: the epochs after the first
    evals = np.array(timer.evals[1:])
    train = float(np.median(epochs_s - evals))
    share = float(np.median(evals / epochs_s))
    images = sum(len(idx) for idx in _batches(len(task.x_train), s.batch))
    return images / train, share, result.compile_seconds


def _batches(n: int, bs: int):
    return [range(i, min(i + bs, n)) for i in range(0, n, bs) if min(bs, n - i) >= 2]


# --- 3. the ceiling: forward, backward, step on one batch already on the device ---
def ceiling(s: Setup, steps: int, windows: int = 3) -> float:
    """The harness's network (no uint8 preprocessing) in the core's settings for the device:
    memory format, autocast, optimizer implementation. The median over `windows`."""
    device = torch.device(s.device)
    config = TrialConfig.model_validate(
        {
            "name": "bench",
            "data": {"source_classes": [], "target_classes": list(range(10)), "image_size": s.size},
            "model": {"arch": s.arch, "pretrained": "none"},
            "train": {"batch_size": s.batch, "device": s.device},
        }
    )
    net = models.build_model(config.model, 10, 0.0).net.to(device)
    fmt = torch.contiguous_format
    if shared.uses_channels_last(config, net, device):
        fmt = torch.channels_last
        net = net.to(memory_format=fmt)
    opt = torch.optim.SGD(
        net.parameters(), lr=0.001, momentum=0.9, **shared.optimizer_options(device)
    )
    x = torch.randn(s.batch, 3, s.size, s.size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (s.batch,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        with shared.autocast(device, config.train.amp):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()

    for _ in range(2):  # warm-up
        step()
    rates = []
    for _ in range(windows):
        _sync(s.device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(s.device)
        rates.append(steps * s.batch / (time.perf_counter() - start))
    return float(np.median(rates))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU, batch 128 only (minutes)")
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    p.add_argument("--steps", type=int, default=20, help="timed steps of the recipe and ceiling")
    p.add_argument("--epochs", type=int, default=6, help="epochs of the core (the first warms up)")
    p.add_argument("--compile", action="store_true", help="also the core with train.compile")
    args = p.parse_args()
    setups = []
    if args.device in ("cpu", "all"):
        setups += [digits_setup(b) for b in ((128,) if args.quick else (32, 128))]
    if args.device in ("cuda", "all") and not args.quick and torch.cuda.is_available():
        setups += [cifar_like_setup(b) for b in (32, 256)]
    lines = []
    print(f"{'configuration':<26} {'recipe':>9} {'core':>9} {'tracked':>9} {'ceiling':>9}  img/s")
    for s in setups:
        r = recipe(s, args.steps)
        c, eval_share, _ = core(s, args.epochs, tracked=False)
        t, _, _ = core(s, args.epochs, tracked=True)
        top = ceiling(s, max(args.steps // 3, 4))
        print(f"{s.name:<26} {r:>9.1f} {c:>9.1f} {t:>9.1f} {top:>9.1f}", flush=True)
        tag = "" if args.quick else f" {s.name.replace(' ', '_')}"
        lines += [
            f"ratio core/ceiling {c / top:.3f}{tag}",
            f"ratio core/recipe {c / r:.3f}{tag}",
            f"ratio tracked/untracked {t / c:.3f}{tag}",
            f"ratio eval/epoch {eval_share:.3f}{tag}",
        ]
        if args.compile:
            k, _, compile_s = core(s, args.epochs, tracked=False, compile=True)
            print(f"{s.name:<26} compiled core {k:.1f} img/s, compile {compile_s:.1f} s")
            lines += [
                f"ratio compiled/core {k / c:.3f}{tag}",
                f"compile_seconds {compile_s:.1f}{tag}",
            ]
    print("\n".join(lines))
    cuda = torch.cuda.is_available() and any(s.device == "cuda" for s in setups)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(
        f"device {name.replace(' ', '_')} torch {torch.__version__} "
        f"threads {torch.get_num_threads()} cores {os.cpu_count()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
