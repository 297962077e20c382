"""Model soups (Wortsman et al., ICML 2022): the weights of several models fine-tuned from the
same starting weights, averaged into one model of the same size.

- `compatible`: whether states can be averaged (the same keys, shapes and dtypes).
- `average`: the uniform mean of state_dicts (integer buffers such as BatchNorm's
  `num_batches_tracked` are taken from the first).
- `greedy`: the paper's recipe. Ingredients in order of their val objective; each one is kept
  only if the soup's val objective does not get worse.
- `recompute_bn`: BatchNorm statistics measured again on the train split, with torch's
  `swa_utils.update_bn`: averaged running statistics are not the statistics of averaged
  weights. A soup of one ingredient is that trial's model as it is (its own statistics), so
  the greedy soup never scores below the best trial on val.

Knows neither Optuna nor MLflow; the study layer (`harness.study.soups`) says what to average
and how to score it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

State = dict[str, torch.Tensor]


def compatible(a: State, b: State) -> str | None:
    """None when `a` and `b` can be averaged, else why not (the first key that differs)."""
    if a.keys() != b.keys():
        missing = sorted(a.keys() ^ b.keys())
        return f"different parameters ({', '.join(missing[:3])}{', ...' * (len(missing) > 3)})"
    for k, v in a.items():
        if v.shape != b[k].shape or v.dtype != b[k].dtype:
            return f"{k}: {tuple(v.shape)} {v.dtype} vs {tuple(b[k].shape)} {b[k].dtype}"
    return None


def average(states: Sequence[State]) -> State:
    """The uniform mean of `states` (floating tensors, accumulated in float64); integer tensors
    come from the first state."""
    if not states:
        raise ValueError("a soup needs at least one ingredient")
    out = {}
    for k, first in states[0].items():
        if first.is_floating_point():
            total = sum(s[k].to(torch.float64) for s in states)
            out[k] = (total / len(states)).to(first.dtype)
        else:
            out[k] = first.clone()
    return out


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def recompute_bn(model: nn.Module, x_train: torch.Tensor, batch_size: int = 256) -> bool:
    """Measure BatchNorm's running statistics again on `x_train` (raw images, the model's own
    input) with `swa_utils.update_bn`; the model is left in eval mode. Returns whether the
    model had BatchNorm layers to update."""
    if not has_batchnorm(model):
        model.eval()
        return False
    device = next(model.parameters()).device
    batches = [x_train[i : i + batch_size].to(device) for i in range(0, len(x_train), batch_size)]
    update_bn(batches, model, device=device)
    model.eval()
    return True


@dataclass(frozen=True)
class Step:
    """One ingredient tried by the greedy soup: the soup's score with it, and whether it stayed."""

    index: int  # the ingredient's position in the candidates
    score: float  # the soup's val objective with it (oriented: higher is better)
    kept: bool


def greedy(
    states: Sequence[State], score: Callable[[State, int], float]
) -> tuple[list[int], float, list[Step]]:
    """Greedy soup over `states`, given best first (by their own val objective). `score(state,
    n)` is the val objective of a model with those weights, the average of `n` ingredients,
    oriented so that higher is better (the caller re-measures BatchNorm when n > 1: a single
    model keeps the statistics it trained with).

    The first ingredient starts the soup; each next one is kept only if the soup with it scores
    no worse (the paper's ">=": an equal score keeps it). Returns (kept indices, the final
    score, the steps)."""
    kept = [0]
    best = score(states[0], 1)
    steps = [Step(0, best, True)]
    for i in range(1, len(states)):
        trial = score(average([states[j] for j in (*kept, i)]), len(kept) + 1)
        keep = trial >= best
        steps.append(Step(i, trial, keep))
        if keep:
            kept.append(i)
            best = trial
    return kept, best, steps
