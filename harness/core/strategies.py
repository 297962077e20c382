"""The fine-tuning strategies' units: the head and the stages, each frozen, unfrozen and given a
learning rate as one; how many stages train in an epoch; the optimizer's named param groups per
unit."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from harness.config.spec import StrategySpec, TrialConfig
from harness.core import models
from harness.core.shared import (
    optimizer_options,
    split_decay,
)


@dataclass(frozen=True)
class Unit:
    name: str  # 'head', or 'stage<i>' (i from 1 at the input)
    depth: int  # 0: the head; the last stage 1, the one below it 2, ...
    modules: tuple[nn.Module, ...]  # every module it holds (train/eval mode)
    decay: tuple[nn.Parameter, ...]  # weights
    no_decay: tuple[nn.Parameter, ...]  # normalization-layer parameters and biases

    @property
    def params(self) -> tuple[nn.Parameter, ...]:
        return self.decay + self.no_decay


def _unit(name: str, depth: int, modules: list[nn.Module], taken: set[int]) -> Unit:
    """`taken`: parameters shared with a unit before, or frozen before fit (left out)."""
    decay, rest = split_decay(modules, taken)
    return Unit(name, depth, tuple(modules), tuple(decay), tuple(rest))


def model_units(model: nn.Module) -> list[Unit]:
    """The head, then the stages from the top down. Parameters that do not require grad when
    this is called are left out (they stay frozen)."""
    blocks, head = models.stages(model), models.head_module(model)
    if not blocks:
        raise ValueError("models.stages: the model has no backbone stages")
    roots = {id(m) for m in (head, *blocks)}
    inside = {id(m) for root in (head, *blocks) for m in root.modules()}
    # modules outside the head and stages and not above them (a stem, a final norm, Preprocess)
    rest = [
        m
        for m in model.modules()
        if id(m) not in inside and not any(id(c) in roots for c in m.modules())
    ]
    taken = {id(p) for p in model.parameters() if not p.requires_grad}
    units = [_unit("head", 0, list(head.modules()), taken)]
    for i in range(len(blocks), 0, -1):
        extra = rest if i == 1 else []
        units.append(
            _unit(f"stage{i}", len(blocks) - i + 1, [*blocks[i - 1].modules(), *extra], taken)
        )
    return units


def trainable_stages(strategy: StrategySpec, epoch: int, n_stages: int) -> int:
    """How many stages, from the top, train in `epoch` (from 1)."""
    return {
        "full": n_stages,
        "linear_probe": 0,
        "partial": max(n_stages - strategy.freeze_stages, 0),  # freezing more: a linear probe
        "lp_ft": 0 if epoch <= strategy.lp_epochs else n_stages,
        "gradual_unfreeze": min((epoch - 1) // strategy.unfreeze_every, n_stages),
    }[strategy.kind]


def set_train_mode(model: nn.Module, frozen: Iterable[Unit], bn_frozen: bool) -> None:
    """Train mode, but frozen units (and with `bn_frozen` every BatchNorm) in eval mode."""
    model.train()
    for unit in frozen:
        for module in unit.modules:
            module.training = False
    if bn_frozen:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.training = False


def param_groups(units: Iterable[Unit], config: TrialConfig, base_lr: float) -> list[dict]:
    s, reg = config.strategy, config.reg
    groups = []
    for u in units:
        lr = base_lr * s.head_lr_mult if u.depth == 0 else base_lr * s.layer_decay**u.depth
        if reg.decay_norm_bias:
            parts = [(u.name, u.params, reg.weight_decay)]
        else:
            parts = [(u.name, u.decay, reg.weight_decay), (f"{u.name}.no_decay", u.no_decay, 0.0)]
        groups += [
            {"name": name, "params": list(ps), "lr": lr, "base_lr": lr, "weight_decay": wd}
            for name, ps, wd in parts
            if ps
        ]
    return groups


def make_optimizer(config: TrialConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """SGD or AdamW over `groups`, fused on CUDA (`optimizer_options`, from the parameters')."""
    t, wd = config.train, config.reg.weight_decay
    first = next((p for g in groups for p in g["params"]), None)
    impl = optimizer_options(first.device if first is not None else torch.device("cpu"))
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=wd, **impl)
    return torch.optim.AdamW(groups, lr=t.lr, weight_decay=wd, **impl)


def _describe_groups(groups: list[dict]) -> list[dict[str, Any]]:
    keys = ("name", "lr", "weight_decay")
    return [{**{k: g[k] for k in keys}, "params": len(g["params"])} for g in groups]
