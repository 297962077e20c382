"""The epoch kernel: the one epoch loop of every training core (`finetune.fit`, `meta.meta_fit`,
`multitask.multitask_fit`), so that they cannot drift apart.

`run` owns what their epochs share: the start (threads, device, seed: `shared.start`), the
epoch range (from a resume state's epoch + 1), the schedule's update at each epoch's start
(`shared.Schedule`), the loss check (`shared.check_loss`), the best epoch (`shared.BestEpoch`,
by the objective's metric and direction), the callbacks (`on_epoch_end`, then the resume state
to those with `on_checkpoint` whose optional `wants_state(epoch)` is true), the ranks'
agreement on going on (`distributed.agree`, with a process group), the resume (the state's
common keys, `harness.core.resume_state`), the fallback when no epoch's metric is finite (the
last weights are kept) and the `Result`.

A task kind supplies only its own parts, as a `Core` that its setup builds on the training
device: one epoch's training (its sums, on the device), the epoch's measurement (its metrics,
from the epoch's one read of the device), what the best epoch keeps and how the kept state is
loaded at the end, and its own keys of the resume state (captured and restored).

Knows neither Optuna nor MLflow.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from harness.config.spec import TrialConfig
from harness.core import distributed, resume_state, shared
from harness.core.shared import Callback


@dataclass(frozen=True)
class Result:
    """What every core returns."""

    best_epoch: int
    best: dict[str, float]  # the per-epoch metrics of the best epoch
    history: list[dict[str, float]]
    best_state: dict[str, torch.Tensor] = field(repr=False)  # on the CPU
    seconds: float  # training seconds, over every resume
    device: str
    threads: int
    compile_seconds: float = 0.0  # fit, train.compile: the warm-up's compilation, apart
    # fit: per epoch, the optimizer's groups at its start: name, lr, weight_decay, params (a count)
    param_groups: list[list[dict[str, Any]]] = field(default_factory=list, repr=False)
    heads: nn.Module | None = field(default=None, repr=False)  # multitask: the best epoch's


def _nothing(*_args) -> None:
    return None


@dataclass
class Core:
    """One task kind's parts, built by its setup on the training device."""

    model: nn.Module  # the raw weights: the resume state's `model`
    schedule: shared.Schedule  # the optimizer and its learning-rate schedule
    generator: torch.Generator  # the core's CPU generator (batch order, episodes, augmentation)
    epochs: int
    train: Callable[[int], Any]  # one epoch's training: its sums, still on the device
    measure: Callable[[int, Any], dict[str, float]]  # the epoch's metrics from those sums
    keep: Callable[[], Any]  # a copy of what a new best epoch keeps
    finish: Callable[[Any], dict[str, torch.Tensor]]  # load what was kept; `best_state` (CPU)
    loss: str = "train_loss_running"  # the metric that `shared.check_loss` checks
    loss_name: str = "training loss"
    begin: Callable[[int], None] = _nothing  # before the epoch's schedule update (fit's phases)
    own: Callable[[], dict] = dict  # its own keys of the resume state, on the CPU
    restore: Callable[[dict], None] = _nothing  # load them (before the common keys)
    close: Callable[[], None] = _nothing  # after the last epoch, whatever happened
    result: Callable[[], dict] = dict  # its own fields of the Result


def run(
    config: TrialConfig,
    setup: Callable[[torch.device], Core],
    callbacks: Iterable[Callback] = (),
    resume: dict | None = None,
    own_keys: Sequence[str] = (),
    group=None,
) -> Result:
    """Train the `Core` that `setup(device)` builds, epoch by epoch; end with the best epoch's
    state loaded (`core.finish`).

    With `resume` (a state offered to `on_checkpoint`; it must hold the common keys and
    `own_keys`, saved under `config`), the core's parts are built as the first time, then the
    state is loaded and the epochs after its epoch run, with callbacks for those only; the
    result (history, best epoch, seconds) covers every epoch. With a process `group`, every
    rank calls `run` in step; rank 0 reports, and every rank goes on, or stops, together.
    """
    started = time.perf_counter()
    if resume is not None:
        resume_state.check_state(resume, config, own_keys)
    callbacks = list(callbacks)
    savers = [cb for cb in callbacks if callable(getattr(cb, "on_checkpoint", None))]
    device = shared.start(config)
    core = setup(device)
    progress = resume_state.Progress(best=shared.BestEpoch.of(config))
    train = config.train

    def report(epoch: int, metrics: dict[str, float]) -> None:
        for cb in callbacks:
            cb.on_epoch_end(epoch, metrics)
        due = [cb for cb in savers if getattr(cb, "wants_state", lambda _e: True)(epoch)]
        if due:  # built only at the epochs some callback keeps it
            state = resume_state.capture(
                epoch, config, core.model, core.schedule, progress, core.generator, device
            )
            state |= core.own()
            state["seconds"] = progress.seconds + time.perf_counter() - started
            for cb in due:
                cb.on_checkpoint(epoch, state)

    try:
        first = 1
        if resume is not None:  # the core's own parts, then the common ones, the RNGs last
            core.restore(resume)
            resume_state.restore(
                resume, core.model, core.schedule, progress, core.generator, device
            )
            first = resume["epoch"] + 1
        for epoch in range(first, core.epochs + 1):
            core.begin(epoch)
            core.schedule.set_lr()
            metrics = core.measure(epoch, core.train(epoch))
            shared.check_loss(metrics[core.loss], epoch, train, core.loss_name)
            progress.history.append(metrics)
            progress.best.update(epoch, metrics, core.keep)
            if group is None:
                report(epoch, metrics)
            else:  # rank 0 reports; every rank goes on, or stops, together
                distributed.agree(group, lambda epoch=epoch, m=metrics: report(epoch, m))
    finally:
        core.close()
    best_epoch, kept = progress.best.epoch, progress.best.state
    if kept is None:  # every epoch's metric was NaN: keep the last weights
        best_epoch, kept = core.epochs, core.keep()
    best_state = core.finish(kept)
    return Result(
        best_epoch=best_epoch,
        best=progress.history[best_epoch - 1],
        history=progress.history,
        best_state=best_state,
        seconds=progress.seconds + time.perf_counter() - started,
        device=str(device),
        threads=torch.get_num_threads(),
        **core.result(),
    )
