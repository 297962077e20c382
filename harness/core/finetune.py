"""The shared fine-tuning core: `fit`, `train_one_epoch`, `evaluate`.

Knows neither Optuna nor MLflow. It reports each epoch through callbacks (anything with an
`on_epoch_end(epoch, metrics)` method); a callback that raises (a pruner's decision) stops
the fit, and the core does not catch it. Deterministic under `config.seed` on the CPU for a
given thread count. The training loop never waits on the device: losses and accuracies are
summed on the device and read once per epoch.

A model trains as units: the head and the stages (`models.stages`; backbone parameters outside
every stage go with the first). Each epoch the strategy says how many stages train, from the
top: full all; linear_probe none; partial all but the first `freeze_stages`; lp_ft none for
`lp_epochs` epochs, then all with a new optimizer at lr x `ft_lr_scale` and a new schedule for
the remaining steps (metric `phase`); gradual_unfreeze none in epoch 1, then one more every
`unfreeze_every` epochs, added to the optimizer (metric `trainable_stages`). A frozen unit has
requires_grad off, is in no optimizer group and is in eval mode (BatchNorm statistics kept).
Param groups are named per unit ('head', 'stage1' .. 'stageN'), lr = base x layer_decay^depth
(the last stage has depth 1), base x head_lr_mult for the head; unless `reg.decay_norm_bias`,
norm parameters and biases are in '<unit>.no_decay' groups with weight_decay 0. `bn: frozen`
keeps every BatchNorm in eval mode. Penalties, MixUp/CutMix, the EMA and SWA are
`regularizers`; with an EMA, the metrics, best state and restored weights are the EMA's; with
SWA (`regularizers.Swa`), from its first epoch on, the average's (its lr: SWALR's).

The epoch loop is the kernel's (`harness.core.kernel`); this module supplies fit's parts (its
phases, an epoch's training, the measurement, its own resume keys). Resume: after every
epoch's `on_epoch_end` calls, callbacks that also have an `on_checkpoint(epoch, state)` method
(and, if they have one, whose `wants_state(epoch)` is true) get fit's whole resume state
(`harness.core.resume_state` lists its keys; built only when some callback has the method),
and `fit(..., resume=state)` on a model built the same way continues at the next epoch exactly
as an uninterrupted fit would on the CPU.

Speed (`benchmarks/README.md` has the measurements): on CUDA a convolutional model trains and
evaluates in the channels_last memory format (`train.channels_last`; the model is handed back,
and `best_state` returned, in the default format), the forward pass and the loss run under
bf16 autocast (`train.amp`) and the optimizer is torch's fused one. The CPU keeps NCHW, fp32
and the single-tensor optimizer: none of them measured clearly faster there, and its results
stay bit for bit what they were. `train.compile` compiles the model with
`torch.compile`, warmed up before the first epoch on a copy of the state that is then put
back, so the result does not change; the warm-up's time is `compile_seconds` (in the result
and in every epoch's metrics), apart from training. Evaluation runs under inference_mode on a
fixed clean-train subset of at most `data.eval_train_max` images.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel

from harness.config.spec import RegSpec, TrialConfig
from harness.core import distributed, kernel, regularizers, resume_state, shared
from harness.core.augment import augment
from harness.core.kernel import Result
from harness.core.regularizers import Mixer, Penalty
from harness.core.shared import (
    Callback,
    Schedule,
    autocast,
    sync,
    uses_channels_last,
)
from harness.core.strategies import (
    Unit,
    _describe_groups,
    make_optimizer,
    model_units,
    param_groups,
    set_train_mode,
    trainable_stages,
)
from harness.data import stream
from harness.data.datasets import TaskData

FitResult = Result  # every core's result (`harness.core.kernel`)


@dataclass
class TrainState:
    """What the training loop carries from step to step; a new phase replaces the optimizer."""

    schedule: Schedule  # the optimizer, its schedule and the global step
    penalty: Penalty | None = None
    mixer: Mixer | None = None
    ema: AveragedModel | None = None
    label_smoothing: float = 0.0
    swa: regularizers.Swa | None = None


def train_one_epoch(
    model,
    run: TrainState,
    x,
    y,
    config: TrialConfig,
    generator: torch.Generator,
    net=None,
    group=None,
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """One pass over (x, y) in seeded random order: augment, mix, loss + penalty, step, EMA.

    Returns (loss sum, correct, images seen, penalty sum over steps) of the running training
    metrics, on the device. The loss is the data loss; with mixing, `correct` compares with the
    argmax of the soft target.

    With a process `group` of K ranks (`net`: the model in DistributedDataParallel), every rank
    draws the same global order, augments and mixes the whole global batch, and trains on its
    slice of it (`distributed.shard`); its loss is its slice's sum x K / the global batch, so
    the averaged gradient is one device's. Batches under 2 x K images are skipped (BatchNorm).
    The loss sum and `correct` are this rank's, `seen` the global count. The forward pass
    draws its randomness (dropout, stochastic depth) from a stream of its own per rank and step
    (`distributed.rank_rng`), so the ranks' slices get independent masks while the global RNG
    (MixUp, CutMix) stays the same on every rank.
    """
    n, bs = len(x), config.train.batch_size
    k = distributed.world(group)
    host_order = torch.randperm(n, generator=generator)  # a streamed split gathers on the host
    order = host_order.to(x.device)
    loss_sum = torch.zeros((), device=x.device)
    penalty_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    seen = 0
    amp, sched = config.train.amp, run.schedule
    for start in range(0, n, bs):
        idx = order[start : start + bs]
        if len(idx) < 2 * k <= n:  # BatchNorm cannot train on a batch of one
            continue
        xb, yb = stream.batch(x, idx, host_order[start : start + bs]), y[idx]
        xb = augment(xb, config.aug, generator)
        target = yb
        if run.mixer is not None:
            xb, target = regularizers.mix_batch(run.mixer, xb, yb)
        if group is not None:  # this rank's slice of the global batch
            mine = distributed.shard(len(idx), group)
            xb, target = xb[mine], target[mine]
            with distributed.rank_rng(config.seed, sched.step, group), autocast(x.device, amp):
                logits = net(xb)
                summed = F.cross_entropy(
                    logits, target, label_smoothing=run.label_smoothing, reduction="sum"
                )
                loss = summed * (k / len(idx))
        else:
            with autocast(x.device, amp):
                logits = model(xb)
                loss = F.cross_entropy(logits, target, label_smoothing=run.label_smoothing)
        total = loss
        if run.penalty is not None:
            penalty = run.penalty()
            total = loss + penalty
            penalty_sum += penalty.detach()
        sched.optimizer.zero_grad(set_to_none=True)
        total.backward()
        sched.set_lr()
        sched.optimizer.step()
        sched.step += 1
        if run.swa is not None:
            run.swa.step()
        if run.ema is not None:
            regularizers.ema_update(run.ema, model)
        loss_sum += loss.detach() * len(idx) if group is None else summed.detach()
        labels = target.argmax(1) if target.ndim == 2 else target
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += len(idx)
    return loss_sum, correct, seen, penalty_sum


@torch.inference_mode()
def evaluate(
    model, x, y, batch_size: int = 1024, amp: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sum, correct) in eval mode, no augmentation, no dropout; still on the device.
    `amp`: bf16 autocast on CUDA (the loss is summed in fp32)."""
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for start in range(0, len(x), batch_size):
        with autocast(x.device, amp):
            logits = model(x[start : start + batch_size])
        logits = logits.float()
        yb = y[start : start + batch_size]
        loss_sum += F.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    return loss_sum, correct


@torch.inference_mode()
def predict(model, x, batch_size: int = 1024) -> torch.Tensor:
    """The logits of every example of `x`, in eval mode, as fp32 on the CPU (a paired
    comparison on one split needs each example's prediction, not only the count)."""
    model.eval()
    return torch.cat(
        [model(x[i : i + batch_size]).float().cpu() for i in range(0, len(x), batch_size)]
    )


def _warm_up(model: nn.Module, x: torch.Tensor, config: TrialConfig, device) -> float:
    """Compile `model` (already `model.compile()`d) by one training forward and backward on the
    first batch and one evaluation forward, then put back every weight, buffer, gradient and
    RNG state: the fit goes on exactly as without it. Returns the seconds it took."""
    sync(device)
    started = time.perf_counter()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = {p: p.grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    rng = resume_state.rng_state(device)
    xb = x[: config.train.batch_size]
    with autocast(device, config.train.amp):
        out = model(xb)
    if out.requires_grad:
        out.float().sum().backward()
    evaluate(model, xb, torch.zeros(len(xb), dtype=torch.long, device=device), amp=config.train.amp)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(state[k])
    for p, g in grads.items():
        p.grad = g
    for m, training in modes.items():
        m.training = training
    resume_state.set_rng_state(rng, device)
    sync(device)
    return time.perf_counter() - started


def _uncompile(model: nn.Module) -> None:
    """Undo `model.compile()`: later calls run eagerly again."""
    if getattr(model, "_compiled_call_impl", None) is not None:
        model._compiled_call_impl = None


def _freeze(units: list[Unit], t: int, reg: RegSpec, anchors: dict) -> Penalty | None:
    """Train the head and the top `t` stages, freeze the rest; the penalty over what trains.

    L1 and L2 apply to the trainable parameters that weight decay applies to (norm parameters
    and biases only with reg.decay_norm_bias), L2-SP to every trainable backbone parameter,
    its head term to every head parameter.
    """
    trainable = units[: 1 + t]
    for i, unit in enumerate(units):
        for p in unit.params:
            p.requires_grad_(i <= t)
    backbone = [p for u in trainable[1:] for p in u.params]
    return regularizers.make_penalty(
        reg,
        decayed=[p for u in trainable for p in (u.params if reg.decay_norm_bias else u.decay)],
        backbone=backbone if anchors else [],
        anchors=[anchors[id(p)] for p in backbone] if anchors else [],
        head=list(units[0].params),
    )


def _next_phase(run: TrainState, config: TrialConfig, units, epoch, t_before, t, steps_per_epoch):
    """LP-FT's switch: a new optimizer over every unit at lr x ft_lr_scale, its schedule over
    the remaining steps. Gradual unfreezing: the newly trainable stages join the optimizer."""
    s, train, sched = config.strategy, config.train, run.schedule
    if s.kind == "lp_ft" and epoch == s.lp_epochs + 1:
        groups = param_groups(units[: 1 + t], config, train.lr * s.ft_lr_scale)
        sched.optimizer = make_optimizer(config, groups)
        sched.start, sched.length = sched.step, (train.epochs - s.lp_epochs) * steps_per_epoch
    elif t > t_before:
        for group in param_groups(units[1 + t_before : 1 + t], config, train.lr):
            sched.optimizer.add_param_group(group)


def _replay_phases(
    run: TrainState, config: TrialConfig, units, epochs: int, steps_per_epoch
) -> int:
    """Rebuild the optimizer's groups as they were after `epochs` (a resume); the number of
    stages that trained in the last of them. The caller then loads the optimizer's state."""
    s, n_stages = config.strategy, len(units) - 1
    t = trainable_stages(s, 1, n_stages)
    for epoch in range(1, epochs + 1):
        t_before, t = t, trainable_stages(s, epoch, n_stages)
        _next_phase(run, config, units, epoch, t_before, t, steps_per_epoch)
    return t


def fit(
    config: TrialConfig,
    model: nn.Module,
    data: TaskData,
    callbacks: Iterable[Callback] = (),
    resume: dict | None = None,
    group=None,
) -> FitResult:
    """Fine-tune `model` on `data` as `config` says; end with the best epoch's weights loaded.

    With `resume` (a state offered to `on_checkpoint`), `model` must be built as for the first
    call: fit loads the state and runs the epochs after the state's, calling the callbacks for
    those only; the result (history, best epoch, seconds) covers every epoch.

    With a process `group` (`distributed`), every rank of it calls fit in step: rank 0's
    weights are broadcast, `strategy.bn: sync` converts BatchNorm to SyncBatchNorm, each rank
    trains on its slice of every global batch and evaluates its slice of the clean-train and
    validation splits, and the metric sums are all-reduced, so that the metrics mean what one
    device's do. Callbacks should be given on rank 0 alone; every rank leaves when it does.
    """
    return kernel.run(
        config,
        lambda device: _setup(config, model, data, group, device),
        callbacks,
        resume,
        resume_state.OWN["finetune"],
        group,
    )


def _setup(config: TrialConfig, model: nn.Module, data: TaskData, group, device) -> kernel.Core:
    """fit's parts for the epoch kernel."""
    generator = torch.Generator().manual_seed(config.seed)
    model.to(device)
    channels_last = uses_channels_last(config, model, device)
    if channels_last:  # before the anchors, EMA and optimizer: they take the format too
        model.to(memory_format=torch.channels_last)
    data = data.to(device)
    s, reg, train = config.strategy, config.reg, config.train
    k = distributed.world(group)
    steps_per_epoch = shared.steps_per_epoch(len(data.x_train), train.batch_size, min_batch=2 * k)
    clean = shared.clean_subset(len(data.x_train), config.data.eval_train_max, config.seed, device)
    x_clean, y_clean = data.x_train[clean], data.y_train[clean]
    n_clean, n_val = len(x_clean), len(data.x_val)
    x_val, y_val, swaps = data.x_val, data.y_val, []
    if group is not None:  # rank 0's weights everywhere; each rank evaluates its slice
        distributed.broadcast_module(model, group)
        part, val_part = distributed.shard(n_clean, group), distributed.shard(n_val, group)
        x_clean, y_clean = x_clean[part], y_clean[part]
        x_val, y_val = x_val[val_part], y_val[val_part]
        if s.bn == "sync":
            swaps = distributed.sync_batchnorm(model, group, device)
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]  # restored at the end
    units = model_units(model)
    n_stages = len(units) - 1
    # L2-SP's anchors: the backbone at the start of fit (the pretrained point)
    anchors = {id(p): p.detach().clone() for u in units[1:] for p in u.params} if reg.l2_sp else {}
    phase_epochs = s.lp_epochs if s.kind == "lp_ft" else train.epochs
    t = trainable_stages(s, 1, n_stages)
    optimizer = make_optimizer(config, param_groups(units[: 1 + t], config, train.lr))
    phase_lr = train.lr * (s.ft_lr_scale if s.kind == "lp_ft" else 1.0)  # SWA starts after
    swa = None
    if reg.swa_start > 0:
        swa = regularizers.Swa(model, reg, train.epochs, steps_per_epoch, phase_lr)
    run = TrainState(
        Schedule(optimizer, train.schedule, phase_epochs * steps_per_epoch),
        mixer=regularizers.make_mixer(reg, data.num_classes),
        ema=regularizers.ema_model(model, reg.ema_decay) if reg.ema_decay > 0 else None,
        label_smoothing=reg.label_smoothing,
        swa=swa,
    )

    def scored() -> nn.Module:  # what is evaluated and kept
        if run.swa is not None:
            return run.swa.evaluated(model)
        return run.ema.module if run.ema is not None else model

    with_penalty = any(c > 0 for c in (reg.l1, reg.l2, reg.l2_sp, reg.l2_sp_head))
    # t: the stages that train; net: the model in DDP over them (net_t); the anchors by name
    now = {"t": t, "net": None, "net_t": None, "cpu_anchors": None}
    now |= {"compiled": False, "compile_seconds": 0.0}
    groups_log: list[list[dict[str, Any]]] = []

    def begin(epoch: int) -> None:
        t_before, now["t"] = now["t"], trainable_stages(s, epoch, n_stages)
        _next_phase(run, config, units, epoch, t_before, now["t"], steps_per_epoch)
        run.penalty = _freeze(units, now["t"], reg, anchors)
        if run.swa is not None:  # from its first epoch, SWALR sets the lr
            run.swa.begin(epoch, run.schedule)

    def train_epoch(epoch: int):
        t, groups = now["t"], run.schedule.optimizer.param_groups
        groups_log.append(_describe_groups(groups))
        lr = next((g["lr"] for g in groups if g["name"].startswith("head")), groups[0]["lr"])
        set_train_mode(model, units[1 + t :], s.bn == "frozen")
        if train.compile and not now["compiled"]:  # before the first epoch this call trains
            model.compile()  # in place: the state_dict's keys and the EMA's copy stay as they were
            now["compiled"] = True
            now["compile_seconds"] = _warm_up(model, data.x_train, config, device)
        if group is not None and now["net_t"] != t:  # DDP over the parameters that train now
            now["net"] = None
            gc.collect()  # the old wrapper's gradient hooks go with it
            now["net"], now["net_t"] = distributed.wrap(model, group, device), t
        sums = train_one_epoch(
            model, run, data.x_train, data.y_train, config, generator, now["net"], group
        )
        if run.swa is not None and epoch >= run.swa.first:  # average, BatchNorm recomputed
            part = None if group is None else (lambda n: distributed.shard(n, group))
            batches = regularizers.train_batches(data.x_train, train.batch_size, 2 * k, part)
            run.swa.average(model, batches, lambda: autocast(device, train.amp))
        if group is not None:  # BatchNorm's running statistics: rank 0's
            distributed.broadcast_module(scored(), group, buffers_only=True)
        return lr, sums

    def measure(epoch: int, trained) -> dict[str, float]:
        lr, (run_loss, run_correct, n_seen, penalty_sum) = trained
        tr_loss, tr_correct = evaluate(scored(), x_clean, y_clean, amp=train.amp)
        va_loss, va_correct = evaluate(scored(), x_val, y_val, amp=train.amp)
        sums = [run_loss, run_correct.float(), tr_loss, tr_correct.float(), va_loss]
        sums += [va_correct.float(), *([penalty_sum] if with_penalty else [])]
        stacked = torch.stack(sums)
        if group is not None:  # sums over examples; the penalty is the same on every rank
            stacked = torch.cat([distributed.sum_all(stacked[:6], group), stacked[6:]])
        sums = stacked.tolist()  # the epoch's one sync with the device
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
        if with_penalty:  # the mean over the epoch's steps of the penalty added to the loss
            m["train_penalty_running"] = sums[6] / steps_per_epoch
        if s.kind == "lp_ft":
            m["phase"] = float(epoch > s.lp_epochs)
        if s.kind == "gradual_unfreeze":
            m["trainable_stages"] = float(now["t"])
        if train.compile:
            m["compile_seconds"] = now["compile_seconds"]
        return m

    def own() -> dict:
        if now["cpu_anchors"] is None:  # once: they never change
            now["cpu_anchors"] = resume_state.by_name(model, anchors)
        swa_state = None if run.swa is None else run.swa.state()
        return resume_state.capture_fit(
            run.schedule, run.ema, now["cpu_anchors"], groups_log, swa_state
        )

    def restore(state: dict) -> None:  # the optimizer's groups as they were, then fit's keys
        now["t"] = _replay_phases(run, config, units, state["epoch"], steps_per_epoch)
        kept = resume_state.restore_fit(state, model, run.schedule, run.ema, anchors, device)
        groups_log[:] = kept
        if run.swa is not None:  # the config check refuses a state saved with SWA off
            run.swa.load(state["swa"], run.schedule)

    def close() -> None:
        now["net"] = None
        distributed.unsync_batchnorm(swaps)
        for p, flag in requires_grad:
            p.requires_grad_(flag)
        if train.compile:
            _uncompile(model)
        if channels_last:  # handed back in the default format, as it came
            model.to(memory_format=torch.contiguous_format)

    def finish(best_state) -> dict[str, torch.Tensor]:
        model.load_state_dict(best_state)
        model.eval()
        return {k: v.cpu().contiguous() for k, v in best_state.items()}

    return kernel.Core(
        model=model,
        schedule=run.schedule,
        generator=generator,
        epochs=train.epochs,
        train=train_epoch,
        measure=measure,
        keep=lambda: shared.copy_state(scored()),
        finish=finish,
        begin=begin,
        own=own,
        restore=restore,
        close=close,
        result=lambda: {"param_groups": groups_log, "compile_seconds": now["compile_seconds"]},
    )
