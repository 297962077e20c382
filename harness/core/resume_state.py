"""The resume state of a running core: moved to the CPU, written atomically, loaded without code.

Every core (`finetune.fit`, `meta.meta_fit`, `multitask.multitask_fit`, through the epoch
kernel `harness.core.kernel`) offers its whole state at the end of every epoch to the
callbacks that have an `on_checkpoint(epoch, state)` method, and the same core called with
`resume=state` continues from it, bit for bit on the CPU (the same thread count). The state is
a plain tree that `torch.load` reads with `weights_only=True`: dicts, lists, tuples, numbers,
strings, None and CPU tensors.

The keys of every core (`COMMON`):

- `version`: `VERSION`, the layout of this tree.
- `config`: the trial config as sorted JSON, less `train.device` and `train.threads`; a resume
  under another config (so also of another task kind) is refused.
- `epoch`: the last finished epoch (from 1); a resume continues at `epoch + 1`.
- `device`: the device it ran on (for information).
- `model`: the model's state_dict (the raw weights, also when an EMA is evaluated).
- `optimizer`: the optimizer's state_dict (its groups hold their `base_lr`).
- `step`, `schedule_start`, `schedule_length`: optimizer steps so far; the step at which the
  current schedule started, and its length in steps (`shared.Schedule`).
- `generator`: the state of the core's torch.Generator (fit's and multitask's: batch order
  and augmentation; meta's: the meta-train episodes).
- `rng`: `{"cpu": torch's global RNG state, "cuda": the CUDA device's or None}` (dropout,
  MixUp, CutMix, heads built at the start).
- `history`: the result's per-epoch metrics so far.
- `best_value`, `best_epoch`, `best_state`: the best epoch so far (`best_state`: what the core
  keeps of it, None while every value was NaN).
- `seconds`: training seconds so far, over every resume.

A core's own keys (`OWN`, by task kind):

- fine-tuning: `optimizer_groups` (the optimizer's groups' names in order: LP-FT replaces the
  optimizer at its switch, gradual unfreezing adds groups), `ema` (the EMA's state_dict, its
  weights and `n_averaged`, or None), `anchors` (L2-SP's anchors, the backbone when fit first
  started, by parameter name; empty when L2-SP is off), `param_groups` (the result's
  optimizer groups per epoch so far) and `swa` (`regularizers.Swa.state`: the SWA average's
  state_dict with its `n_averaged`, and SWALR's state_dict, None before SWA's first epoch; None
  when SWA is off). `KEYS` is fit's whole state. A key of `ADDED` came after the layout's
  first states: a state without it was saved before, and so with that feature off.
- meta-learning: none (its episodes come from `generator`; the meta-val episodes are fixed).
- multi-task: `heads`, the state_dict of the auxiliary heads and the log-variances
  (`multitask.MultiTaskHeads`); its `best_state` is `{"model": ..., "heads": ...}`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from harness.config.spec import TrialConfig
from harness.core import checkpoints
from harness.core.shared import BestEpoch, Schedule

if TYPE_CHECKING:
    from torch.optim.swa_utils import AveragedModel

VERSION = 1
COMMON = (
    "version",
    "config",
    "epoch",
    "device",
    "model",
    "optimizer",
    "step",
    "schedule_start",
    "schedule_length",
    "generator",
    "rng",
    "history",
    "best_value",
    "best_epoch",
    "best_state",
    "seconds",
)
OWN = {
    "finetune": ("optimizer_groups", "ema", "anchors", "param_groups", "swa"),
    "meta": (),
    "multitask": ("heads",),
}
KEYS = COMMON + OWN["finetune"]  # fit's state
ADDED = ("swa",)  # own keys added since VERSION 1's first states: absent means off


def cpu_tree(obj: Any, copy: bool = True) -> Any:
    """`obj` with every tensor detached on the CPU (a copy, unless `copy` is false and it is
    there already), and every dict a plain dict; lists, tuples and scalars as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=copy)
    if isinstance(obj, dict):
        return {k: cpu_tree(v, copy) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(cpu_tree(v, copy) for v in obj)
    return obj


def rng_state(device: torch.device) -> dict[str, torch.Tensor | None]:
    """torch's global RNG states that fit draws from on `device`."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict[str, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def config_key(config: TrialConfig) -> str:
    """The config as sorted JSON, less what may change between a run and its resume (where it
    runs, and `compile`, which does not change the result)."""
    tree = config.model_dump(mode="json")
    for key in ("device", "threads", "compile"):
        tree["train"].pop(key, None)
    return json.dumps(tree, sort_keys=True)


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v}
    return out


def check_state(state: dict, config: TrialConfig, own: Sequence[str] = OWN["finetune"]) -> None:
    """Raise ValueError unless `state` is a resume state of this layout, with the common keys
    and a core's `own` (fit's by default), saved by `config`."""
    if not isinstance(state, dict) or state.get("version") != VERSION:
        got = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"resume: not a resume state of version {VERSION} (got {got!r})")
    if "config" in state and state["config"] != config_key(config):  # another config or kind
        saved, now = _flat(json.loads(state["config"])), _flat(json.loads(config_key(config)))
        # a key added to the config since the state was saved, at its default, is no change
        default = _flat(json.loads(config_key(type(config)(name=config.name))))
        diff = sorted(
            k
            for k in saved.keys() | now.keys()
            if saved.get(k) != now.get(k) and not (k not in saved and now[k] == default.get(k))
        )
        if diff:
            raise ValueError(f"resume: the state was saved with another config (differs in {diff})")
    missing = [k for k in (*COMMON, *own) if k not in state and k not in ADDED]
    if missing:
        raise ValueError(f"resume: the state lacks {missing}")


@dataclass
class Progress:
    """What the kernel keeps across epochs besides the core's parts."""

    best: BestEpoch  # the best epoch so far; its state on the core's device
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0  # training seconds before this call (a resumed core's)


def by_name(model: nn.Module, by_id: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors keyed by parameter id (L2-SP's anchors) keyed by parameter name, on the CPU."""
    return {
        n: cpu_tree(by_id[id(p)], copy=False) for n, p in model.named_parameters() if id(p) in by_id
    }


def to_device(tree: Any, device: torch.device) -> Any:
    """`tree` (dicts, lists, tuples of tensors) with every tensor copied to `device`."""
    if isinstance(tree, torch.Tensor):
        return tree.to(device, copy=True)
    if isinstance(tree, dict):
        return {k: to_device(v, device) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(to_device(v, device) for v in tree)
    return tree


def capture(
    epoch: int,
    config: TrialConfig,
    model: nn.Module,
    schedule: Schedule,
    progress: Progress,
    generator: torch.Generator,
    device: torch.device,
) -> dict:
    """The common keys after `epoch`, on the CPU, less `seconds` (the caller's clock)."""
    return {
        "version": VERSION,
        "config": config_key(config),
        "epoch": epoch,
        "device": str(device),
        "model": cpu_tree(model.state_dict()),
        "optimizer": cpu_tree(schedule.optimizer.state_dict()),
        "step": schedule.step,
        "schedule_start": schedule.start,
        "schedule_length": schedule.length,
        "generator": generator.get_state(),
        "rng": rng_state(device),
        "history": [dict(m) for m in progress.history],
        "best_value": progress.best.value,
        "best_epoch": progress.best.epoch,
        "best_state": cpu_tree(progress.best.state, copy=False),  # replaced, never written to
    }


def restore(
    state: dict,
    model: nn.Module,
    schedule: Schedule,
    progress: Progress,
    generator: torch.Generator,
    device: torch.device,
) -> None:
    """Load the common keys of `state` into a core's freshly built objects (after its own
    keys: fit's optimizer must have the state's groups already); the RNGs last. Nothing of
    `state` is written to later."""
    model.load_state_dict(state["model"])
    schedule.optimizer.load_state_dict(cpu_tree(state["optimizer"]))  # a copy: it may keep them
    schedule.step, schedule.start, schedule.length = (
        state[k] for k in ("step", "schedule_start", "schedule_length")
    )
    best = state["best_state"]
    progress.history = [dict(m) for m in state["history"]]
    progress.best.value, progress.best.epoch = state["best_value"], state["best_epoch"]
    progress.best.state = None if best is None else to_device(best, device)
    progress.seconds = state["seconds"]
    generator.set_state(state["generator"])
    set_rng_state(state["rng"], device)


# --- fit's own keys ------------------------------------------------------------------------------
def capture_fit(
    schedule: Schedule,
    ema: AveragedModel | None,
    anchors: dict[str, torch.Tensor],
    groups_log: list[list[dict[str, Any]]],
    swa: dict | None = None,
) -> dict:
    """fit's own keys; `anchors` by name, on the CPU already (`by_name`), never written to;
    `swa`: `regularizers.Swa.state()` or None."""
    return {
        "optimizer_groups": [g["name"] for g in schedule.optimizer.param_groups],
        "ema": None if ema is None else cpu_tree(ema.state_dict()),
        "anchors": anchors,
        "param_groups": [[dict(g) for g in groups] for groups in groups_log],
        "swa": cpu_tree(swa),
    }


def restore_fit(
    state: dict,
    model: nn.Module,
    schedule: Schedule,
    ema: AveragedModel | None,
    anchors: dict[int, torch.Tensor],
    device: torch.device,
) -> list[list[dict[str, Any]]]:
    """Load fit's own keys, its optimizer's groups rebuilt already (`finetune._replay_phases`);
    the optimizer groups per epoch so far."""
    names = [g["name"] for g in schedule.optimizer.param_groups]
    if names != state["optimizer_groups"]:
        raise ValueError(
            f"resume: optimizer groups {names}, the state's {state['optimizer_groups']}"
        )
    if ema is not None:
        ema.load_state_dict(state["ema"])
    for name, p in model.named_parameters():
        if id(p) in anchors:
            anchors[id(p)] = state["anchors"][name].to(device)
    return [[dict(g) for g in groups] for groups in state["param_groups"]]


def save_state(state: dict, path: str | Path) -> None:
    """Write `state` to `path` atomically (`files.atomic_write`): a failure leaves the previous
    file and no temporary."""
    checkpoints.save_tree(state, path)


def load_state_file(path: str | Path) -> dict:
    """A state written by `save_state`, on the CPU. Loaded with `weights_only=True`: a file
    that would run code (or build any object but tensors and plain containers) is refused."""
    state = checkpoints.load_tree(path)
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise ValueError(f"{path}: not a resume state of version {VERSION}")
    return state
