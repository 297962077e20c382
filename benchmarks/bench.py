"""Images per second of the founding recipe's loop, the harness core and the ceiling.

    python benchmarks/bench.py --quick        # CPU: digits upscaled to 32 px, resnet18, batch 128
    python benchmarks/bench.py                # CPU batch 32 and 128; with a GPU also resnet50
    python benchmarks/bench.py --device cuda  # the GPU configurations only (224 px, b32, b256)

Run by hand, never as a timed test. Everything in one run uses the same device, model, data
and batch size. Prints a readable table, then one machine-readable line per figure:
`ratio core/ceiling X`, `ratio core/recipe X`, `ratio tracked/untracked X`, `ratio eval/epoch X`
(with --quick exactly one per name), and a `device ...` line.
"""

from __future__ import annotations

import argparse
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

from harness import finetune, models  # noqa: E402
from harness.data import TaskData  # noqa: E402
from harness.spec import TrialConfig  # noqa: E402


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
    def __init__(self, device: str):
        self.device, self.marks = device, []

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        _sync(self.device)
        self.marks.append(time.perf_counter())


def core(s: Setup, epochs: int, tracked: bool) -> tuple[float, float]:
    """(training images per second, evaluation share of an epoch) in steady state."""
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
            "train": {"epochs": epochs, "batch_size": s.batch, "lr": 0.001, "device": s.device},
        }
    )
    model = models.model_for(config, task)
    timer, callbacks = _Timer(s.device), []
    if tracked:
        from harness import tracking

        folder = Path(tempfile.mkdtemp(prefix="bench-"))
        client = tracking.connect(tracking.default_tracking_uri(folder))
        exp = tracking.experiment_id(client, "bench", folder, tracking.default_tracking_uri(folder))
        run = client.create_run(exp).info.run_id
        callbacks.append(tracking.EpochLogger(client, run))
    finetune.fit(config, model, task, [*callbacks, timer])
    epoch = float(np.median(np.diff(timer.marks)))  # steady state: epochs after the first
    data = task.to(s.device)
    x_clean = data.x_train[: config.data.eval_train_max]
    y_clean = data.y_train[: config.data.eval_train_max]
    _sync(s.device)
    start = time.perf_counter()
    for x, y in ((x_clean, y_clean), (data.x_val, data.y_val)):
        loss, _ = finetune.evaluate(model, x, y)
        loss.item()
    evaluation = time.perf_counter() - start
    train = max(epoch - evaluation, 1e-9)
    return (len(task.x_train) // s.batch) * s.batch / train, evaluation / epoch


# --- 3. the ceiling: forward, backward, step on one batch already on the device ---
def ceiling(s: Setup, steps: int) -> float:
    model = torchvision.models.get_model(s.arch, num_classes=10).to(s.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    x = torch.randn(s.batch, 3, s.size, s.size, device=s.device)
    y = torch.randint(0, 10, (s.batch,), device=s.device)
    for i in range(steps + 2):
        if i == 2:
            _sync(s.device)
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    _sync(s.device)
    return steps * s.batch / (time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU, batch 128 only (minutes)")
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    p.add_argument("--steps", type=int, default=20, help="timed steps of the recipe and ceiling")
    p.add_argument("--epochs", type=int, default=6, help="epochs of the core (the first warms up)")
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
        c, eval_share = core(s, args.epochs, tracked=False)
        t, _ = core(s, args.epochs, tracked=True)
        top = ceiling(s, args.steps)
        print(f"{s.name:<26} {r:>9.1f} {c:>9.1f} {t:>9.1f} {top:>9.1f}")
        tag = "" if args.quick else f" {s.name.replace(' ', '_')}"
        lines += [
            f"ratio core/ceiling {c / top:.3f}{tag}",
            f"ratio core/recipe {c / r:.3f}{tag}",
            f"ratio tracked/untracked {t / c:.3f}{tag}",
            f"ratio eval/epoch {eval_share:.3f}{tag}",
        ]
    print("\n".join(lines))
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device {name} torch {torch.__version__} threads {torch.get_num_threads()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
