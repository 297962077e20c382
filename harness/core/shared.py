"""What every training core shares (`finetune.fit`, `meta.meta_fit`, `multitask.multitask_fit`):
one home for each rule, so the cores cannot drift apart.

- the start of a fit: CPU threads, the device, the seed (`start`);
- the CUDA speed paths: channels_last for convolutional models, bf16 autocast, fused optimizers
  (the CPU keeps NCHW, fp32 and the single-tensor optimizer: its results stay bit for bit);
- the schedule's multiplier (`lr_factor`), the schedule (`Schedule`) and the number of
  optimizer steps in an epoch;
- the fixed clean-train subset that the eval-mode train metrics (and so the gap) are measured on;
- the loss fault check (`TrainingFault`);
- the best-epoch tracker, which honours the objective's metric and direction;
- the decay/no-decay rule: normalization-layer parameters and biases get no weight decay.

Knows neither Optuna nor MLflow.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from harness.config.spec import TrainSpec, TrialConfig

# Normalization layers: their parameters get no weight decay (unless reg.decay_norm_bias).
NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)


class Callback(Protocol):
    """Optionally also `on_checkpoint(epoch: int, state: dict) -> None`: the resume state after
    the epoch (CPU tensors, shared by every such callback: read it, do not change it)."""

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None: ...


class TrainingFault(RuntimeError):
    """The training itself went wrong (`kind`: nan or diverged); the same config would again."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


# --- The start of a fit ------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device: cuda was asked for, but no CUDA device is visible")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # also seeds every CUDA device


def start(config: TrialConfig) -> torch.device:
    """Set the CPU threads (`train.threads`), seed torch (`seed`); the device to train on."""
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    device = resolve_device(config.train.device)
    seed_everything(config.seed)
    return device


# --- Speed: memory format, autocast, optimizer implementation ---------------------------------
def is_convolutional(model: nn.Module) -> bool:
    """At least a tenth of the parameters are in Conv2d layers (CNNs; not vision transformers,
    whose only convolution is a patch embedding)."""
    total = sum(p.numel() for p in model.parameters())
    conv = sum(
        p.numel() for m in model.modules() if isinstance(m, nn.Conv2d) for p in m.parameters()
    )
    return total > 0 and conv >= 0.1 * total


def uses_channels_last(config: TrialConfig, model: nn.Module, device: torch.device) -> bool:
    """`train.channels_last` on CUDA for a convolutional model. The CPU stays NCHW: there
    resnet18 at 32 px measured within noise of it, the small CNN's gain alone is lost in the
    overheads of the digits studies' 2 steps an epoch, and it would change the CPU's results."""
    return config.train.channels_last and device.type == "cuda" and is_convolutional(model)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when `enabled`; nothing on any other device (fp32)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def optimizer_options(device: torch.device) -> dict[str, bool]:
    """The optimizer implementation: torch's fused kernels on CUDA; on the CPU the single-tensor
    loop (foreach and fused measured no faster there, and it keeps results as they were)."""
    return {"fused": True} if device.type == "cuda" else {"foreach": False}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- Steps, schedule, the clean-train subset ----------------------------------------------------
def steps_per_epoch(n: int, batch_size: int, min_batch: int = 2) -> int:
    """Optimizer steps in one pass over n images: batches under `min_batch` are skipped
    (BatchNorm cannot train on one image; K data-parallel ranks need 2 x K)."""
    return sum(1 for i in range(0, n, batch_size) if min(batch_size, n - i) >= min_batch) or 1


def lr_factor(schedule: str, step: int, total: int) -> float:
    """The schedule's multiplier of each group's base lr at `step` of `total`."""
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


@dataclass
class Schedule:
    """An optimizer and its learning-rate schedule: every group's lr is its `base_lr` x
    `lr_factor(kind, step - start, length)`. The kernel sets it at each epoch's start, a core
    before each optimizer step (and counts `step`); a new phase (LP-FT) replaces `optimizer`
    and starts a schedule of its own (`start`, `length`). While `held` (fit's SWA, whose SWALR
    sets the lrs), `set_lr` leaves them as they are."""

    optimizer: torch.optim.Optimizer
    kind: str  # constant or cosine
    length: int  # the current schedule's optimizer steps
    start: int = 0  # the global step at which it starts
    step: int = 0  # global optimizer steps so far
    held: bool = False

    def factor(self, step: int) -> float:
        """The multiplier of each group's `base_lr` at global `step`."""
        return lr_factor(self.kind, step - self.start, self.length)

    def set_lr(self) -> None:
        if self.held:
            return
        factor = self.factor(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor


def clean_subset(n: int, limit: int, seed: int, device) -> torch.Tensor:
    """Indices of the fixed subset of the train split (all of it when n <= limit) on which the
    eval-mode train metrics, and so the overfitting gap, are measured (`data.eval_train_max`)."""
    if n <= limit:
        return torch.arange(n, device=device)
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randperm(n, generator=g)[:limit].sort().values.to(device)


# --- Faults ------------------------------------------------------------------------------------
def check_loss(loss: float, epoch: int, train: TrainSpec, what: str = "training loss") -> None:
    """A NaN or infinite loss, or one above `train.max_loss`, is a TrainingFault."""
    if not math.isfinite(loss):
        raise TrainingFault("nan", f"the {what} is {loss} at epoch {epoch}")
    if loss > train.max_loss:
        raise TrainingFault(
            "diverged",
            f"the {what} {loss:.4g} passed train.max_loss {train.max_loss:g} at epoch {epoch}",
        )


# --- The best epoch ------------------------------------------------------------------------------
class BestEpoch:
    """Keeps the epoch whose `metric` is best in `direction` (the objective's first metric): the
    first of equal values wins, NaN never does. `state()` is called only on a new best."""

    def __init__(self, metric: str, direction: str):
        self.metric, self.direction = metric, direction
        self.value: float | None = None
        self.epoch = 0
        self.state = None

    @classmethod
    def of(cls, config: TrialConfig) -> BestEpoch:
        return cls(config.objective.metric, config.objective.direction)

    def better(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.value is None:
            return True
        return value > self.value if self.direction == "maximize" else value < self.value

    def update(self, epoch: int, metrics: dict[str, float], state) -> bool:
        """Record `epoch` if it is the best so far (`state()` gives what to keep)."""
        value = metrics[self.metric]
        if not self.better(value):
            return False
        self.value, self.epoch, self.state = value, epoch, state()
        return True


def copy_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --- Weight decay: one rule ---------------------------------------------------------------------
def no_decay(module: nn.Module, name: str) -> bool:
    """Normalization-layer parameters and biases get no weight decay."""
    return isinstance(module, NORMS) or name == "bias"


def split_decay(
    modules: Iterable[nn.Module], taken: set[int] | None = None
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decay, no_decay) parameters of `modules`, each once; ids in `taken` are skipped, and
    every parameter returned is added to it."""
    taken = set() if taken is None else taken
    decay, rest = [], []
    for module in modules:
        for name, p in module.named_parameters(recurse=False):
            if id(p) in taken:
                continue
            taken.add(id(p))
            (rest if no_decay(module, name) else decay).append(p)
    return decay, rest
