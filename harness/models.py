"""Build a model: the small CNN with a new head, dropout before it, and pretrained weights.

A built model is an `ImageModel`: `prep` (uint8 images -> float, channels, size, normalization,
on the device, per batch) then `net` (the network). `head_module` is the part replaced for the
target task; `stages` are the backbone's blocks from input to output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from harness.data import DIGITS_MEAN, DIGITS_STD
from harness.spec import ModelSpec


@dataclass(frozen=True)
class Inputs:
    """What the data looks like: channels, side length, per-channel mean and std in [0, 1]."""

    channels: int = 1
    size: int = 8
    mean: tuple[float, ...] = DIGITS_MEAN
    std: tuple[float, ...] = DIGITS_STD

    @classmethod
    def of(cls, task) -> Inputs:
        return cls(task.channels, task.image_size, tuple(task.mean), tuple(task.std))


class Preprocess(nn.Module):
    """uint8 (N, C, H, W) -> float in [0, 1] -> `channels` -> `size` x `size` -> normalized."""

    def __init__(self, channels: int, size: int | None, mean, std):
        super().__init__()
        self.channels, self.size = channels, size
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if x.shape[1] != self.channels:  # a grey image for a colour network
            x = x.expand(-1, self.channels, -1, -1)
        if self.size is not None and x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        return (x - self.mean) / self.std


class ImageModel(nn.Module):
    def __init__(self, prep: Preprocess, net: nn.Module):
        super().__init__()
        self.prep, self.net = prep, net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.prep(x))


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class SmallCNN(nn.Module):
    """Three conv stages for 8x8 (or larger) single-channel images, then a linear head."""

    def __init__(self, num_classes: int, width: int = 32, dropout: float = 0.0, in_ch: int = 1):
        super().__init__()
        self.stages = nn.Sequential(
            nn.Sequential(_block(in_ch, width), _block(width, width)),
            nn.Sequential(nn.MaxPool2d(2), _block(width, 2 * width)),
            nn.Sequential(nn.MaxPool2d(2), _block(2 * width, 2 * width)),
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.stages(x)))


def head_module(model: ImageModel) -> nn.Module:
    return model.net.head


def stages(model: ImageModel) -> list[nn.Module]:
    """The backbone's blocks with parameters, from the input to the head (head excluded)."""
    return list(model.net.stages)


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    head = {id(p) for p in head_module(model).parameters()}
    return [p for p in model.parameters() if id(p) not in head]


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict file, loaded without unpickling code (weights_only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def build_model(
    spec: ModelSpec,
    num_classes: int,
    dropout: float = 0.0,
    pretrained: str | Path | None = None,
    inputs: Inputs = Inputs(),
) -> ImageModel:
    """A fresh model for `num_classes`; with `pretrained`, every weight but the head's is loaded.

    A pretrained file may be a harness checkpoint (keys `net.*`) or a bare network state_dict.
    """
    model = SmallCNN(num_classes, width=spec.width, dropout=dropout, in_ch=inputs.channels)
    if pretrained is not None:
        loaded = {k.removeprefix("net."): v for k, v in load_state(pretrained).items()}
        state = {k: v for k, v in loaded.items() if not k.startswith("head.")}
        own = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        shapes = [
            f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
            for k, v in own.items()
            if k in state and state[k].shape != v.shape
        ]
        if missing or unexpected or shapes:
            raise ValueError(
                f"model.pretrained: {pretrained} does not fit {spec.arch} (width {spec.width}): "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}, shapes differ {shapes[:3]}"
            )
        model.load_state_dict(state, strict=False)
    return ImageModel(Preprocess(inputs.channels, None, inputs.mean, inputs.std), model)
