"""Data augmentation on the training device, batched, with randomness drawn per image.

`augment(x, spec, generator)` takes a uint8 batch (N, C, H, W) and returns the augmented batch
(uint8, or float in [0, 1]); the eval path never calls it. (A torchvision v2 transform called
on a whole batch draws one set of parameters for all of it: these functions draw per image.)
"""

from __future__ import annotations

import torch

from harness.spec import AugSpec


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Per-image random translation of a batch: zero-pad, then crop each image at its own offset.

    (A torchvision v2 transform called on a batch draws one offset for the whole batch.)
    """
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator).to(x.device)
    rows = offsets[0][:, None] + torch.arange(h, device=x.device)  # (n, h)
    cols = offsets[1][:, None] + torch.arange(w, device=x.device)  # (n, w)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()


def augment(x: torch.Tensor, spec: AugSpec, generator: torch.Generator) -> torch.Tensor:
    """The policy `spec.policy` applied to a training batch."""
    if spec.policy == "none":
        return x
    if spec.policy == "crop":
        return random_crop(x, spec.crop_padding, generator)
    raise NotImplementedError(f"aug.policy: {spec.policy} is not implemented yet")
