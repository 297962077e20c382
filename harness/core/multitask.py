"""Multi-task core: one shared backbone, several classification heads, fixed or uncertainty
loss weighting (Kendall et al. 2018), `multitask_fit`.

Knows neither Optuna nor MLflow. On the epoch kernel (`harness.core.kernel`) like
`finetune.fit`: it reports each epoch through callbacks (`on_epoch_end(epoch, metrics)`; an
exception from one, a pruner's decision, propagates), reads the device once per epoch, keeps
the best epoch's weights (by the objective's metric and direction, measured on the target
task), offers its resume state (with the heads and log-variances) and resumes from it, and is
deterministic under the trial's seed on the CPU for a thread count. It reads the trial's
`train:` (epochs, batch, lr, optimizer, schedule, device, threads, max_loss, and on CUDA amp
and channels_last as `fit` does), `reg.weight_decay` and `reg.dropout` (before each new head),
`aug:`, `data.eval_train_max` and `multitask.weighting`; `train.compile` is refused by the
spec.

The model is any `ImageModel` (`models.build_model`) whose head has the target task's classes
(the first of `tasks`):
that head serves the target task, so after `multitask_fit` the model is an ordinary harness
model for the target task (evaluate it, save it, fine-tune it with `fit`). Every other task
gets a new head (dropout, then a linear layer) on the backbone's pooled features (the input of
`models.head_module`, taken by a forward pre-hook); those heads and the learned log-variances
are `MultiTaskHeads`, returned in the result.

Tasks (`Task`) derive their labels from the data's labels y (0..k-1, in `data.classes` order):
the data's own labels (`labels=None`), a label function `y -> labels`, a lookup tensor indexed
by y (one entry per class: `digit_tasks` builds parity and "greater than 4" that way), or a
mapping {"train": ..., "val": ...} of per-image label tensors of those splits.

Loss: `fixed`: sum_i w_i L_i (`Task.weight`); `uncertainty`: sum_i exp(-s_i) L_i + s_i with a
learned log-variance s_i per task (from 0, trained by the same optimizer, no weight decay); at
its optimum s_i = log L_i, so a task with a larger loss gets a smaller weight exp(-s_i).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from harness.config.spec import TrialConfig
from harness.core import kernel, models, resume_state, shared
from harness.core.augment import augment
from harness.core.kernel import Result
from harness.core.shared import Callback, Schedule, autocast
from harness.data.datasets import TaskData

Labels = Callable[[torch.Tensor], torch.Tensor] | torch.Tensor | Mapping[str, torch.Tensor] | None


@dataclass(frozen=True, eq=False)
class Task:
    name: str  # letters, digits, underscores: metric names are `{name}_val_acc`, ...
    num_classes: int
    labels: Labels = None  # None: the data's labels; a function of y; a lookup; per split
    weight: float = 1.0  # its loss weight under `fixed` weighting

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", self.name):
            raise ValueError(f"Task.name: {self.name!r}: letters, digits and _, from a letter")
        if self.num_classes < 2:
            raise ValueError(f"Task {self.name}: num_classes must be >= 2")
        if self.weight < 0:
            raise ValueError(f"Task {self.name}: weight must be >= 0")

    def targets(self, y: torch.Tensor, split: str) -> torch.Tensor:
        """This task's labels for the images of `split` whose data labels are `y`."""
        labels = self.labels
        if labels is None:
            out = y
        elif isinstance(labels, torch.Tensor):
            out = labels.to(y.device)[y]
        elif isinstance(labels, Mapping):
            if split not in labels:
                raise ValueError(f"Task {self.name}: no per-image labels for split {split!r}")
            out = labels[split].to(y.device)
        else:
            out = labels(y)
        out = out.long()
        if out.shape != y.shape:
            raise ValueError(f"Task {self.name}: {tuple(out.shape)} labels for {len(y)} images")
        if len(out) and not 0 <= int(out.min()) <= int(out.max()) < self.num_classes:
            raise ValueError(f"Task {self.name}: labels outside 0..{self.num_classes - 1}")
        return out


def digit_tasks(classes: Sequence[int | str] = tuple(range(10))) -> tuple[Task, ...]:
    """digit (the data's labels), parity (odd = 1) and gt4 (digit > 4) for digit `classes`."""
    digits = [int(c) for c in classes]
    return (
        Task("digit", len(digits)),
        Task("parity", 2, torch.tensor([d % 2 for d in digits])),
        Task("gt4", 2, torch.tensor([int(d > 4) for d in digits])),
    )


def uncertainty_loss(losses: torch.Tensor, log_vars: torch.Tensor) -> torch.Tensor:
    """Kendall et al. (2018): sum_i exp(-s_i) L_i + s_i."""
    return (torch.exp(-log_vars) * losses + log_vars).sum()


class MultiTaskHeads(nn.Module):
    """The new heads (every task but the target) and the log-variances (uncertainty)."""

    def __init__(self, in_features: int, tasks: Sequence[Task], dropout: float, learned: bool):
        super().__init__()
        self.heads = nn.ModuleDict(
            {
                t.name: nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, t.num_classes))
                for t in tasks
            }
        )
        self.log_vars = nn.Parameter(torch.zeros(len(tasks) + 1), requires_grad=learned)


MultiTaskResult = Result  # every core's result (`harness.core.kernel`), with its `heads`


def _linear_of(head: nn.Module) -> nn.Linear:
    linear = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ValueError("multitask_fit: the model's head has no linear layer")
    return linear[-1]


@contextmanager
def _features(model: nn.Module):
    """While active, every forward of `model` stores the head's input in the yielded list."""
    store: list[torch.Tensor] = []

    def hook(_module, args):
        store.clear()
        store.append(args[0])

    handle = models.head_module(model).register_forward_pre_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def _forward(model, heads: MultiTaskHeads, store, x, target: str) -> dict[str, torch.Tensor]:
    out = {target: model(x)}
    features = store[0].flatten(1)
    out.update({name: head(features) for name, head in heads.heads.items()})
    return out


def _optimizer(config: TrialConfig, model: nn.Module, heads: MultiTaskHeads, device):
    """SGD (momentum) or AdamW; no weight decay on norm parameters, biases and log-variances
    (`shared.split_decay`, the rule `fit` uses); fused on CUDA."""
    t, wd = config.train, config.reg.weight_decay
    params = [*model.modules(), *heads.heads.modules()]
    decay, no_decay = shared.split_decay(
        params, {id(p) for p in model.parameters() if not p.requires_grad}
    )
    if heads.log_vars.requires_grad:
        no_decay.append(heads.log_vars)
    groups = [
        {"params": decay, "weight_decay": wd, "base_lr": t.lr},
        {"params": no_decay, "weight_decay": 0.0, "base_lr": t.lr},
    ]
    impl = shared.optimizer_options(device)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, **impl)
    return torch.optim.AdamW(groups, lr=t.lr, **impl)


@torch.inference_mode()
def _evaluate(model, heads, store, x, labels: dict[str, torch.Tensor], target, amp, batch=1024):
    """Per task (loss sum, correct) in eval mode, stacked: (2 * tasks,) on the device."""
    model.eval()
    heads.eval()
    sums = torch.zeros(2 * len(labels), device=x.device)
    for start in range(0, len(x), batch):
        with autocast(x.device, amp):
            out = _forward(model, heads, store, x[start : start + batch], target)
        out = {k: v.float() for k, v in out.items()}
        for i, (name, y) in enumerate(labels.items()):
            yb = y[start : start + batch]
            sums[2 * i] += F.cross_entropy(out[name], yb, reduction="sum")
            sums[2 * i + 1] += (out[name].argmax(1) == yb).sum()
    return sums


def multitask_fit(
    config: TrialConfig,
    model: nn.Module,
    tasks: Sequence[Task],
    data: TaskData,
    callbacks: Iterable[Callback] = (),
    resume: dict | None = None,
) -> MultiTaskResult:
    """Train `model` (its head: the target task's, `tasks[0]`) and a head per other task on
    `data`'s train split; end with the best epoch's weights loaded.

    Each epoch the callbacks get, per task T: `T_train_loss`, `T_train_acc` (eval mode on the
    clean train subset, as fit), `T_val_loss`, `T_val_acc`, `T_overfit_gap` (train acc - val
    acc) and `T_weight` (its loss weight: w_T, or exp(-s_T)), with uncertainty weighting
    `T_log_var`; the target's as `train_loss`, `train_acc`, `val_loss`, `val_acc`,
    `overfit_gap`, `overfit_gap_loss`; `train_loss_running` (the weighted loss over the
    epoch's steps) and `lr`.

    Resume as `finetune.fit`: callbacks with `on_checkpoint` get the resume state after each
    epoch (with the heads and log-variances, `harness.core.resume_state`), and
    `multitask_fit(..., resume=state)` with the same tasks, on a model built the same way,
    continues at the next epoch as an uninterrupted run would.
    """
    names = [t.name for t in tasks]
    if not tasks or len(set(names)) != len(names):
        raise ValueError(f"multitask_fit: task names {names} must be unique, the target first")
    head = _linear_of(models.head_module(model))
    if head.out_features != tasks[0].num_classes:
        raise ValueError(
            f"multitask_fit: the model's head has {head.out_features} outputs; the target task "
            f"{tasks[0].name} has {tasks[0].num_classes} classes"
        )
    return kernel.run(
        config,
        lambda device: _setup(config, model, list(tasks), data, head.in_features, device),
        callbacks,
        resume,
        resume_state.OWN["multitask"],
    )


def _setup(config: TrialConfig, model, ordered: list[Task], data: TaskData, features, device):
    """multitask_fit's parts for the epoch kernel."""
    train, target = config.train, ordered[0]  # log_vars[0]: the target
    uncertainty = config.multitask.weighting == "uncertainty"
    generator = torch.Generator().manual_seed(config.seed)
    model.to(device)
    closing = ExitStack()
    if shared.uses_channels_last(config, model, device):
        model.to(memory_format=torch.channels_last)
        # handed back in the default format, as it came
        closing.callback(lambda: model.to(memory_format=torch.contiguous_format))
    data = data.to(device)
    heads = MultiTaskHeads(features, ordered[1:], config.reg.dropout, uncertainty).to(device)
    train_y = {t.name: t.targets(data.y_train, "train") for t in ordered}
    val_y = {t.name: t.targets(data.y_val, "val") for t in ordered}
    clean = shared.clean_subset(len(data.x_train), config.data.eval_train_max, config.seed, device)
    x_clean, clean_y = data.x_train[clean], {k: v[clean] for k, v in train_y.items()}
    weights = torch.tensor([t.weight for t in ordered], device=device)
    n, bs = len(data.x_train), train.batch_size
    total = train.epochs * shared.steps_per_epoch(n, bs)
    schedule = Schedule(_optimizer(config, model, heads, device), train.schedule, total)
    store = closing.enter_context(_features(model))  # closed first: a LIFO stack

    def train_epoch(epoch: int):
        lr = schedule.optimizer.param_groups[0]["lr"]  # train.lr x the factor at its start
        model.train()
        heads.train()
        running = torch.zeros((), device=device)
        seen = 0
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, bs):
            idx = order[start : start + bs]
            if len(idx) < 2 <= n:  # BatchNorm cannot train on a batch of one
                continue
            xb = augment(data.x_train[idx], config.aug, generator)
            with autocast(device, train.amp):
                out = _forward(model, heads, store, xb, target.name)
                losses = torch.stack(
                    [F.cross_entropy(out[k].float(), y[idx]) for k, y in train_y.items()]
                )
            if uncertainty:
                loss = uncertainty_loss(losses, heads.log_vars)
            else:
                loss = (weights * losses).sum()
            schedule.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            schedule.set_lr()
            schedule.optimizer.step()
            schedule.step += 1
            running += loss.detach() * len(idx)
            seen += len(idx)
        return lr, running, seen

    def measure(epoch: int, trained) -> dict[str, float]:
        lr, running, seen = trained
        tr = _evaluate(model, heads, store, x_clean, clean_y, target.name, train.amp)
        va = _evaluate(model, heads, store, data.x_val, val_y, target.name, train.amp)
        log_vars = heads.log_vars.detach()
        used = torch.exp(-log_vars) if uncertainty else weights
        sums = torch.cat([tr, va, running.view(1), log_vars, used]).tolist()  # one sync
        m = _metrics(ordered, sums, len(x_clean), len(data.x_val), uncertainty)
        m["train_loss_running"] = sums[4 * len(ordered)] / max(seen, 1)
        m["lr"] = lr
        return m

    def finish(kept) -> dict[str, torch.Tensor]:
        model.load_state_dict(kept["model"])
        heads.load_state_dict(kept["heads"])
        model.eval()
        heads.eval()
        return {k: v.cpu().contiguous() for k, v in kept["model"].items()}

    return kernel.Core(
        model=model,
        schedule=schedule,
        generator=generator,
        epochs=train.epochs,
        train=train_epoch,
        measure=measure,
        keep=lambda: {"model": shared.copy_state(model), "heads": shared.copy_state(heads)},
        finish=finish,
        own=lambda: {"heads": resume_state.cpu_tree(heads.state_dict())},
        restore=lambda state: heads.load_state_dict(state["heads"]),
        close=closing.close,
        result=lambda: {"heads": heads},
    )


def _metrics(ordered, sums: list[float], n_clean: int, n_val: int, uncertainty: bool):
    """The epoch's per-task metrics and the target's under the plain names, from the sums."""
    k, m = len(ordered), {}
    for i, t in enumerate(ordered):
        m[f"{t.name}_train_loss"] = sums[2 * i] / n_clean
        m[f"{t.name}_train_acc"] = sums[2 * i + 1] / n_clean
        m[f"{t.name}_val_loss"] = sums[2 * k + 2 * i] / n_val
        m[f"{t.name}_val_acc"] = sums[2 * k + 2 * i + 1] / n_val
        m[f"{t.name}_overfit_gap"] = m[f"{t.name}_train_acc"] - m[f"{t.name}_val_acc"]
        m[f"{t.name}_weight"] = sums[4 * k + 1 + k + i]
        if uncertainty:
            m[f"{t.name}_log_var"] = sums[4 * k + 1 + i]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "overfit_gap"):
        m[key] = m[f"{ordered[0].name}_{key}"]
    m["overfit_gap_loss"] = m["val_loss"] - m["train_loss"]
    return m


def predict(model: nn.Module, heads: MultiTaskHeads, x: torch.Tensor, target: str):
    """Every task's logits for a batch, in eval mode: {task: logits}."""
    model.eval()
    heads.eval()
    with torch.no_grad(), _features(model) as store:
        return _forward(model, heads, store, x, target)
