"""One trial on K devices: the process group's primitives that `finetune.fit` uses (slices,
broadcasts, metric sums, the ranks' agreement, SyncBatchNorm on the CPU), and the checks of a
K-device config. `harness.core.ranks` starts the ranks and runs a trial on them.

`train.devices_per_trial` K > 1. The process that runs the trial (the study process, or
`reproduce`) is rank 0: it starts ranks 1..K-1 with `torch.multiprocessing` (spawn context),
and every rank joins one process group (`torch.distributed`: nccl on CUDA, gloo on the CPU)
through a `TCPStore` that rank 0 serves on a free local port. Rank 0 sends the trial's config,
its data hash and resume state by `broadcast_object_list`; each other rank loads the same data
split (checked by its hash), builds the same architecture without weights, and runs the same
`finetune.fit` with the process group and no callbacks. `fit` broadcasts rank 0's weights, wraps
the model in `DistributedDataParallel`, gives each rank its slice of every global batch (the
global order and augmentation are one device's), and all-reduces the metric sums; its callbacks
(MLflow, the pruner, resume states) run on rank 0 alone, which then broadcasts go on / stop so
that every rank leaves together (`agree`).

Devices: on CUDA, rank r trains on `cuda:r` of the trial's CUDA_VISIBLE_DEVICES group (a
worker's K GPUs, `harness.study.workers.assign`). On the CPU, K ranks may be at most the CPU cores,
and they split the process's threads (`rank_threads`; `train.threads`, when set, is per rank).

Faults: a rank that dies or raises ends the trial with `RankFailed` (the study records
`harness.fault=rank`); a peer's closed socket fails gloo's collectives at once, a hung rank
fails them after `timeout_seconds()` (env HARNESS_DIST_TIMEOUT, default 300 s). Whatever way
rank 0 leaves (a fault, a pruning, SIGTERM), it kills the other ranks, and a rank whose parent
dies is killed by the kernel (PR_SET_PDEATHSIG): no rank outlives its trial.

Core-level: imports neither Optuna nor MLflow.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from harness.config.spec import SpecError, TrialConfig

STOP, GO = 1, 0


class RankFailed(RuntimeError):
    """A rank of a data-parallel trial died, raised, or stopped answering."""


class Stopped(Exception):
    """Rank 0 left the fit (a pruning, a fault, an interrupt): the other ranks stop too."""


def timeout_seconds() -> float:
    return float(os.environ.get("HARNESS_DIST_TIMEOUT", "300"))


# --- Devices and threads ---------------------------------------------------------------------
def uses_cuda(config: TrialConfig) -> bool:
    d = config.train.device
    return d == "cuda" or (d == "auto" and torch.cuda.is_available())


def check_devices(config: TrialConfig, what: str = "train.devices_per_trial") -> None:
    """K at most the visible GPUs (CUDA) or the CPU cores (the CPU): SpecError naming the key."""
    k = config.train.devices_per_trial
    if k == 1:
        return
    if uses_cuda(config):
        have, kind = torch.cuda.device_count(), "visible GPUs (CUDA_VISIBLE_DEVICES)"
    else:
        have, kind = len(os.sched_getaffinity(0)), "CPU cores of this process"
    if k > have:
        raise SpecError(f"{what}: {k} devices per trial, but there are only {have} {kind}")


def rank_threads(config: TrialConfig) -> int:
    """CPU threads of each rank: `train.threads`, else the process's threads split over K."""
    if config.train.threads:
        return config.train.threads
    return max(1, torch.get_num_threads() // config.train.devices_per_trial)


# --- What fit does with a process group (collectives; every rank calls them in step) ----------
def rank_of(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def world(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def shard(n: int, group) -> slice:
    """This rank's contiguous slice of n items (sizes differ by at most one)."""
    k, r = world(group), rank_of(group)
    base, extra = divmod(n, k)
    start = r * base + min(r, extra)
    return slice(start, start + base + (r < extra))


def broadcast_module(module: nn.Module, group, buffers_only: bool = False) -> None:
    """Rank 0's parameters and buffers (or its buffers only) on every rank."""
    with torch.no_grad():
        for t in [*([] if buffers_only else module.parameters()), *module.buffers()]:
            dist.broadcast(t.data, src=dist.get_global_rank(group, 0), group=group)


def sum_all(values: torch.Tensor, group) -> torch.Tensor:
    """The element-wise sum over the ranks (a new tensor)."""
    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def rank_rng(seed: int, step: int, group):
    """A context in which torch's RNGs draw from a stream of this rank and step, and after
    which they are as before: every rank keeps the same global RNG state (it mixes the same
    global batch, and a resume state holds one RNG state for all)."""
    devices = [torch.cuda.current_device()] if dist.get_backend(group) == "nccl" else []
    fork = torch.random.fork_rng(devices=devices)

    @contextlib.contextmanager
    def seeded():
        with fork:
            torch.manual_seed((seed * 1_000_003 + step * 1_009 + rank_of(group) + 1) % 2**63)
            yield

    return seeded()


def agree(group, act) -> None:
    """Rank 0 runs `act` (its callbacks); every rank learns whether to go on. A callback that
    raises on rank 0 (a pruning, an interrupt, a fault) is re-raised there after the others are
    told to stop; they raise `Stopped`."""
    device = torch.device("cuda") if dist.get_backend(group) == "nccl" else torch.device("cpu")
    flag = torch.tensor([GO], device=device)
    if rank_of(group) == 0:
        try:
            act()
        except BaseException:
            flag.fill_(STOP)
            with contextlib.suppress(Exception):
                dist.broadcast(flag, src=dist.get_global_rank(group, 0), group=group)
            raise
    dist.broadcast(flag, src=dist.get_global_rank(group, 0), group=group)
    if int(flag.item()) == STOP:
        raise Stopped("rank 0 stopped the trial")


def wrap(model: nn.Module, group, device: torch.device) -> nn.Module:
    """`model` in DistributedDataParallel over its parameters that train now (the caller wraps
    again when that set changes: LP-FT's switch, gradual unfreezing). Buffers (BatchNorm's
    running statistics) are rank 0's, broadcast at each forward (torch's default)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = None
    if device.type == "cuda":
        ids = [device.index if device.index is not None else torch.cuda.current_device()]
    return DistributedDataParallel(
        model,
        device_ids=ids,
        process_group=group,  # buffers: rank 0's, broadcast at each forward (the default)
    )


# --- BatchNorm: `strategy.bn: sync` -----------------------------------------------------------
class GlooSyncBatchNorm(_BatchNorm):
    """What torch's SyncBatchNorm does on CUDA, for the CPU (torch's, and DDP, refuse it there):
    in training, the batch mean and variance over every rank's slice of the global batch (a
    differentiable all-reduce of the sums), so that K ranks normalise as one device would."""

    process_group = None

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    @classmethod
    def of(cls, bn: _BatchNorm) -> GlooSyncBatchNorm:
        """A copy of `bn` sharing its parameters and buffers."""
        out = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        if bn.affine:
            out.weight, out.bias = bn.weight, bn.bias
        if bn.track_running_stats:
            out.running_mean, out.running_var = bn.running_mean, bn.running_var
            out.num_batches_tracked = bn.num_batches_tracked
        out.train(bn.training)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        group = dist.group.WORLD
        dims = [d for d in range(x.dim()) if d != 1]
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), count])
        with warnings.catch_warnings():  # deprecated in 2.14 for a private module's
            warnings.simplefilter("ignore", FutureWarning)
            stats = torch.distributed.nn.functional.all_reduce(stats, group=group)
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = stats[c : 2 * c] / n - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum
                if m is None:
                    m = 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * n / (n - 1).clamp(min=1)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def sync_batchnorm(model: nn.Module, group, device: torch.device) -> list[tuple]:
    """Replace every BatchNorm of `model` by a SyncBatchNorm (GlooSyncBatchNorm on the CPU)
    sharing its parameters and buffers; the swaps, for `unsync_batchnorm`."""
    swaps = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            synced_kinds = (nn.SyncBatchNorm, GlooSyncBatchNorm)
            if isinstance(child, _BatchNorm) and not isinstance(child, synced_kinds):
                if device.type != "cuda":
                    synced = GlooSyncBatchNorm.of(child)
                else:  # the default group as None: the EMA's deep copy cannot copy a group
                    scope = None if group is dist.group.WORLD else group
                    synced = nn.SyncBatchNorm.convert_sync_batchnorm(child, scope)
                setattr(parent, name, synced)
                swaps.append((parent, name, child))
    return swaps


def unsync_batchnorm(swaps: list[tuple]) -> None:
    """Put the original BatchNorm modules back, with the synced ones' state."""
    for parent, name, original in reversed(swaps):
        synced = getattr(parent, name)
        original.load_state_dict(synced.state_dict())
        original.train(synced.training)
        setattr(parent, name, original)
