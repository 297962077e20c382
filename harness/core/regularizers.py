"""Regularizers the fine-tuning core calls: loss penalties, MixUp/CutMix, and an EMA of weights.

Plain functions, no state of their own. Penalties are sums on the device (no host reads), so
adding them to the loss keeps the training loop free of syncs. Conventions:

- `l1_penalty(ps)` = sum |w|; `l2_penalty(ps)` = 1/2 sum w^2, so that a coefficient lambda on
  it gives the gradient lambda * w of SGD's (coupled) weight decay.
- `l2_sp_penalty(ps, anchors)` = 1/2 sum (w - w0)^2 (Li et al. 2018, L2-SP): alpha times it pulls
  the backbone toward its pretrained point w0; beta times `l2_penalty` of the new head is the
  paper's second term.
- MixUp and CutMix are torchvision.transforms.v2's, on float images in [0, 1]; targets become
  probabilities (rows sum to one). They draw from torch's global RNG (seeded by the core).
- The EMA is a torch.optim.swa_utils.AveragedModel with get_ema_multi_avg_fn and use_buffers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.transforms import v2

from harness.config.spec import RegSpec

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
