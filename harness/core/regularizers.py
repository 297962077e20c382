"""Regularizers the fine-tuning core calls: loss penalties, MixUp/CutMix, an EMA of weights, SWA.

Plain functions with no state of their own, but for SWA's `Swa` (its average and SWALR, which
the resume state holds). Penalties are sums on the device (no host reads), so
adding them to the loss keeps the training loop free of syncs. Conventions:

- `l1_penalty(ps)` = sum |w|; `l2_penalty(ps)` = 1/2 sum w^2, so that a coefficient lambda on
  it gives the gradient lambda * w of SGD's (coupled) weight decay.
- `l2_sp_penalty(ps, anchors)` = 1/2 sum (w - w0)^2 (Li et al. 2018, L2-SP): alpha times it pulls
  the backbone toward its pretrained point w0; beta times `l2_penalty` of the new head is the
  paper's second term.
- MixUp and CutMix are torchvision.transforms.v2's, on float images in [0, 1]; targets become
  probabilities (rows sum to one). They draw from torch's global RNG (seeded by the core).
- The EMA is a torch.optim.swa_utils.AveragedModel with get_ema_multi_avg_fn and use_buffers.
- SWA (`Swa`) is torch.optim.swa_utils' AveragedModel (equal weights), SWALR and update_bn.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import SWALR, AveragedModel, get_ema_multi_avg_fn, update_bn
from torchvision.transforms import v2

from harness.config.spec import RegSpec
from harness.core.shared import Schedule

Penalty = Callable[[], torch.Tensor]


# --- Loss penalties --------------------------------------------------------------------------
def _total(terms: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(terms).sum() if terms else torch.zeros(())


def l1_penalty(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum |w| over `params` (a 0-dim tensor on their device)."""
    return _total([p.abs().sum() for p in params])


def l2_penalty(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """1/2 sum w^2 over `params`: its gradient is w."""
    return 0.5 * _total([p.pow(2).sum() for p in params])


def l2_sp_penalty(params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor]) -> torch.Tensor:
    """1/2 sum (w - w0)^2: zero at the anchors, its gradient w - w0 points away from them."""
    if len(params) != len(anchors):
        raise ValueError(f"l2_sp_penalty: {len(params)} parameters but {len(anchors)} anchors")
    return 0.5 * _total([(p - a).pow(2).sum() for p, a in zip(params, anchors, strict=True)])


def make_penalty(
    reg: RegSpec,
    *,
    decayed: Sequence[nn.Parameter],
    backbone: Sequence[nn.Parameter],
    anchors: Sequence[torch.Tensor],
    head: Sequence[nn.Parameter],
) -> Penalty | None:
    """The loss penalty of `reg` as a function of the current weights; None when it is zero.

    l1 and l2 apply to `decayed` (the trainable weights that weight decay applies to), l2_sp to
    `backbone` toward `anchors` (the same order), l2_sp_head to `head`.
    """
    terms: list[tuple[float, Callable[[], torch.Tensor]]] = []
    if reg.l1 > 0 and decayed:
        terms.append((reg.l1, lambda: l1_penalty(decayed)))
    if reg.l2 > 0 and decayed:
        terms.append((reg.l2, lambda: l2_penalty(decayed)))
    if reg.l2_sp > 0 and backbone:
        terms.append((reg.l2_sp, lambda: l2_sp_penalty(backbone, anchors)))
    if reg.l2_sp_head > 0 and head:
        terms.append((reg.l2_sp_head, lambda: l2_penalty(head)))
    if not terms:
        return None

    def penalty() -> torch.Tensor:
        return _total([coef * term() for coef, term in terms])

    return penalty


# --- MixUp / CutMix --------------------------------------------------------------------------
Mixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def make_mixer(reg: RegSpec, num_classes: int) -> Mixer | None:
    """MixUp, CutMix, or a random choice of the two per batch (both alphas > 0); None: off."""
    mixes: list[nn.Module] = []
    if reg.mixup_alpha > 0:
        mixes.append(v2.MixUp(alpha=reg.mixup_alpha, num_classes=num_classes))
    if reg.cutmix_alpha > 0:
        mixes.append(v2.CutMix(alpha=reg.cutmix_alpha, num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


def unit_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1]; float images are taken as already in [0, 1]."""
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def mix_batch(mixer: Mixer, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch (uint8 or float images, integer labels) -> (mixed float images in
    [0, 1], soft targets (N, num_classes) whose rows sum to one)."""
    return mixer(unit_float(x), y)


# --- EMA of the weights ----------------------------------------------------------------------
def ema_model(model: nn.Module, decay: float) -> AveragedModel:
    """An EMA copy of `model` (parameters and buffers), starting at its current weights."""
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema.update_parameters(model)  # the first update copies: the EMA starts at `model`
    return ema


@torch.no_grad()
def ema_update(ema: AveragedModel, model: nn.Module) -> None:
    """One EMA step: ema <- decay * ema + (1 - decay) * model, with the AveragedModel's own
    multi_avg_fn, on every floating parameter and buffer.

    This is `ema.update_parameters(model)` after its first call, less its per-step host reads
    (it tests `n_averaged == 0` and copies `n_averaged` to the device on every call, which waits
    on a GPU). Integer buffers (BatchNorm's `num_batches_tracked`) are copied, not averaged.
    """
    groups: dict[tuple[torch.device, torch.dtype], tuple[list, list]] = {}
    pairs = zip(
        [*ema.module.parameters(), *ema.module.buffers()],
        [*model.parameters(), *model.buffers()],
        strict=True,
    )
    for averaged, current in pairs:
        if averaged.is_floating_point():
            group = groups.setdefault((averaged.device, averaged.dtype), ([], []))
            group[0].append(averaged.detach())
            group[1].append(current.detach())
        else:
            averaged.copy_(current)
    for averaged_list, current_list in groups.values():
        ema.multi_avg_fn(averaged_list, current_list, ema.n_averaged)
    ema.n_averaged += 1


# --- SWA: stochastic weight averaging inside a fit -------------------------------------------
class Swa:
    """Stochastic weight averaging (Izmailov et al. 2018) on torch.optim.swa_utils.

    From epoch `first` (`RegSpec.swa_first_epoch`: ceil(swa_start x epochs) + 1) to the end:

    - the lr: at that epoch's start (`begin`) SWALR takes the optimizer's lrs over from the
      schedule (`Schedule.held`). Stepped after every optimizer step (`step`), it anneals each
      group's lr (cosine) over that first SWA epoch's steps, from the schedule's value to the
      group's SWA lr, and keeps it there. A group's SWA lr: `reg.swa_lr` x its base lr / the
      phase's base lr (`phase_lr`: train.lr, after LP-FT's switch train.lr x ft_lr_scale), so
      layer_decay and head_lr_mult keep their ratios; with `reg.swa_lr` 0, its base lr x the
      schedule's factor at the SWA start (a constant lr: the one it had then).
    - the weights: after each of those epochs (`average`) the model joins an AveragedModel with
      equal weights (the mean of the weights at the ends of the SWA epochs so far); then the
      BatchNorm layers that train recompute their running statistics in a pass of `update_bn`
      over the clean train split (no augmentation; frozen BatchNorm keeps its statistics, and
      dropout and stochastic depth stay off). The fit evaluates and keeps that model.
    """

    def __init__(
        self, model: nn.Module, reg: RegSpec, epochs: int, steps_per_epoch: int, phase_lr: float
    ) -> None:
        first = reg.swa_first_epoch(epochs)
        if first is None:
            raise ValueError("Swa: reg.swa_start is 0 (SWA is off)")
        self.first, self.steps_per_epoch = first, steps_per_epoch
        self.swa_lr, self.phase_lr = reg.swa_lr, phase_lr
        self.averaged = AveragedModel(model)  # buffers copied from the model; BN recomputed
        self.scheduler: SWALR | None = None  # from the first SWA epoch's start

    def evaluated(self, model: nn.Module) -> nn.Module:
        """What the fit measures and keeps: the average once SWA has started, else `model`."""
        return model if self.scheduler is None else self.averaged.module

    def _lr(self, group: dict, schedule: Schedule) -> float:
        if self.swa_lr == 0:
            return group["base_lr"] * schedule.factor((self.first - 1) * self.steps_per_epoch)
        return self.swa_lr * group["base_lr"] / self.phase_lr

    def _scheduler(self, schedule: Schedule, swa_lrs: list[float]) -> SWALR:
        schedule.held = True
        return SWALR(
            schedule.optimizer, swa_lrs, anneal_epochs=self.steps_per_epoch, anneal_strategy="cos"
        )

    def begin(self, epoch: int, schedule: Schedule) -> None:
        """At an epoch's start, after fit's phase change: from the first SWA epoch, SWALR sets
        the lrs; a group that joined since (gradual unfreezing) gets its SWA lr at once (SWALR's
        anneal is over by then)."""
        if epoch < self.first:
            return
        groups = schedule.optimizer.param_groups
        if self.scheduler is None:
            schedule.set_lr()  # the schedule's lrs at the start: where the anneal starts
            self.scheduler = self._scheduler(schedule, [self._lr(g, schedule) for g in groups])
        for group in groups:
            if "swa_lr" not in group:
                group["swa_lr"] = group["lr"] = self._lr(group, schedule)

    def step(self) -> None:
        """After an optimizer step: SWALR's next lrs (from the first SWA epoch)."""
        if self.scheduler is not None:
            self.scheduler.step()

    @torch.no_grad()
    def average(self, model: nn.Module, batches: Iterable[torch.Tensor], context) -> None:
        """After a SWA epoch: `model` joins the average, whose BatchNorm statistics (of the
        layers in train mode in `model`) `update_bn` recomputes on `batches`, each forward in
        `context()` (the fit's autocast)."""
        self.averaged.update_parameters(model)
        training = {n for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.training}
        bns = [m for n, m in self.averaged.module.named_modules() if n in training]
        update_bn(batches, _BnPass(self.averaged.module, bns, context))
        self.averaged.module.eval()

    def state(self) -> dict:
        """The resume state's `swa`: the AveragedModel's state_dict (its `n_averaged` too) and
        SWALR's (None before the first SWA epoch)."""
        scheduler = None if self.scheduler is None else self.scheduler.state_dict()
        return {"model": self.averaged.state_dict(), "scheduler": scheduler}

    def load(self, state: dict, schedule: Schedule) -> None:
        """Load `state` (`state()`), before the optimizer's state: that holds the groups'
        `swa_lr` and lrs, which building SWALR here sets for now."""
        self.averaged.load_state_dict(state["model"])
        if state["scheduler"] is not None:
            lrs = [g["lr"] for g in schedule.optimizer.param_groups]
            self.scheduler = self._scheduler(schedule, lrs)
            self.scheduler.load_state_dict(copy.deepcopy(state["scheduler"]))


class _BnPass(nn.Module):
    """What `update_bn` sees of a model: only the BatchNorm layers `bns` (reset, recomputed);
    "train mode" puts those alone in train mode, the rest of the model stays in eval mode.

    The n-th forward of a pass sets their momentum to 1/n: the cumulative mean that update_bn's
    momentum None gives (the same float), less BatchNorm's read of `num_batches_tracked` to the
    host for it at every layer and batch (a wait on a GPU). update_bn puts the momenta back."""

    def __init__(self, module: nn.Module, bns: list[nn.Module], context) -> None:
        super().__init__()
        self.inner, self.bns, self.context = module, bns, context
        self.training, self.seen = False, 0

    def modules(self) -> Iterator[nn.Module]:
        return iter(self.bns)

    def train(self, mode: bool = True) -> _BnPass:
        self.training, self.seen = mode, 0
        self.inner.eval()
        for bn in self.bns:
            bn.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += 1
        for bn in self.bns:
            bn.momentum = 1.0 / self.seen
        with self.context():
            return self.inner(x)


def train_batches(
    x, batch_size: int, min_batch: int = 2, part: Callable[[int], slice] | None = None
) -> Iterator[torch.Tensor]:
    """The train split `x` (a tensor or a streamed split) in order, in batches of `batch_size`,
    less a last one under `min_batch` (as training skips it); with `part`, this rank's slice of
    each."""
    n = len(x)
    for start in range(0, n, batch_size):
        xb = x[start : start + batch_size]
        if len(xb) < min_batch <= n:
            continue
        yield xb if part is None else xb[part(len(xb))]
