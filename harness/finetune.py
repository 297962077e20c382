"""The shared fine-tuning core: `fit`, `train_one_epoch`, `evaluate`.

Knows neither Optuna nor MLflow. It reports each epoch through callbacks (anything with an
`on_epoch_end(epoch, metrics)` method); a callback that raises (a pruner's decision) stops
the fit, and the core does not catch it. Deterministic under `config.seed` on the CPU for a
given thread count. The training loop never waits on the device: losses and accuracies are
summed on the device and read once per epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from harness.augment import augment
from harness.data import TaskData
from harness.models import backbone_parameters, head_module
from harness.spec import TrialConfig


class Callback(Protocol):
    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None: ...


@dataclass(frozen=True)
class FitResult:
    best_epoch: int
    best: dict[str, float]  # the per-epoch metrics of the best epoch
    history: list[dict[str, float]]
    best_state: dict[str, torch.Tensor] = field(repr=False)  # on the CPU
    seconds: float
    device: str
    threads: int


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device: cuda was asked for, but no CUDA device is visible")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # also seeds every CUDA device


def _optimizer(config: TrialConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    t, wd = config.train, config.reg.weight_decay
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=wd)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=wd)


def _schedule(config: TrialConfig, optimizer, total_steps: int):
    if config.train.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps)),
    )


def _set_train_mode(model: nn.Module, kind: str) -> None:
    model.train()
    if kind == "linear_probe":  # the backbone is frozen, BatchNorm statistics included
        model.eval()
        head_module(model).train()


def trainable_parameters(model: nn.Module, kind: str) -> list[nn.Parameter]:
    if kind == "linear_probe":
        for p in backbone_parameters(model):
            p.requires_grad_(False)
        return list(head_module(model).parameters())
    return [p for p in model.parameters() if p.requires_grad]


def train_one_epoch(
    model, optimizer, scheduler, x, y, config: TrialConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over (x, y) in seeded random order.

    Returns (loss sum, correct, images seen) of the running training metrics, on the device.
    """
    n, bs = len(x), config.train.batch_size
    order = torch.randperm(n, generator=generator).to(x.device)
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    seen = 0
    for start in range(0, n, bs):
        idx = order[start : start + bs]
        if len(idx) < 2 <= n:  # BatchNorm cannot train on a batch of one
            continue
        xb, yb = x[idx], y[idx]
        xb = augment(xb, config.aug, generator)
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach() * len(idx)
        correct += (logits.detach().argmax(1) == yb).sum()
        seen += len(idx)
    return loss_sum, correct, seen


@torch.no_grad()
def evaluate(model, x, y, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sum, correct) in eval mode, no augmentation, no dropout; still on the device."""
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for start in range(0, len(x), batch_size):
        logits = model(x[start : start + batch_size])
        yb = y[start : start + batch_size]
        loss_sum += F.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    return loss_sum, correct


def _clean_train_subset(data: TaskData, limit: int, seed: int):
    """A fixed subset of the train split (all of it when small) for the eval-mode train metric."""
    n = len(data.x_train)
    if n <= limit:
        return data.x_train, data.y_train
    g = torch.Generator().manual_seed(seed + 1)
    idx = torch.randperm(n, generator=g)[:limit].sort().values.to(data.x_train.device)
    return data.x_train[idx], data.y_train[idx]


def _better(value: float, best: float | None, direction: str) -> bool:
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value > best if direction == "maximize" else value < best


def fit(
    config: TrialConfig, model: nn.Module, data: TaskData, callbacks: Iterable[Callback] = ()
) -> FitResult:
    """Fine-tune `model` on `data` as `config` says; end with the best epoch's weights loaded."""
    started = time.perf_counter()
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    device = resolve_device(config.train.device)
    seed_everything(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model.to(device)
    data = data.to(device)
    params = trainable_parameters(model, config.strategy.kind)
    optimizer = _optimizer(config, params)
    bs, n_train = config.train.batch_size, len(data.x_train)
    steps_per_epoch = sum(1 for s in range(0, n_train, bs) if min(bs, n_train - s) >= 2) or 1
    scheduler = _schedule(config, optimizer, steps_per_epoch * config.train.epochs)
    x_clean, y_clean = _clean_train_subset(data, config.data.eval_train_max, config.seed)
    metric, direction = config.objective.metric, config.objective.direction
    history: list[dict[str, float]] = []
    best_value, best_epoch, best_state = None, 0, None
    for epoch in range(1, config.train.epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        _set_train_mode(model, config.strategy.kind)
        run_loss, run_correct, n_seen = train_one_epoch(
            model, optimizer, scheduler, data.x_train, data.y_train, config, generator
        )
        tr_loss, tr_correct = evaluate(model, x_clean, y_clean)
        va_loss, va_correct = evaluate(model, data.x_val, data.y_val)
        sums = torch.stack(
            [
                run_loss,
                run_correct.float(),
                tr_loss,
                tr_correct.float(),
                va_loss,
                va_correct.float(),
            ]
        ).tolist()  # the epoch's one sync with the device
        n_clean, n_val = len(x_clean), len(data.x_val)
        m = {
            "train_loss": sums[2] / n_clean,
            "train_acc": sums[3] / n_clean,
            "val_loss": sums[4] / n_val,
            "val_acc": sums[5] / n_val,
            "train_loss_running": sums[0] / max(n_seen, 1),
            "train_acc_running": sums[1] / max(n_seen, 1),
            "lr": lr,
        }
        m["overfit_gap"] = m["train_acc"] - m["val_acc"]
        m["overfit_gap_loss"] = m["val_loss"] - m["train_loss"]
        history.append(m)
        if _better(m[metric], best_value, direction):
            best_value, best_epoch = m[metric], epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for cb in callbacks:
            cb.on_epoch_end(epoch, m)
    if best_state is None:  # every epoch's metric was NaN: keep the last weights
        best_epoch = config.train.epochs
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return FitResult(
        best_epoch=best_epoch,
        best=history[best_epoch - 1],
        history=history,
        best_state={k: v.cpu() for k, v in best_state.items()},
        seconds=time.perf_counter() - started,
        device=str(device),
        threads=torch.get_num_threads(),
    )
