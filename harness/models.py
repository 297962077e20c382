"""Build a model: the small CNN with a new head, dropout before it, and pretrained weights.

Every model exposes `.head` (the part replaced for the target task); the rest is the backbone.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from harness.spec import ModelSpec


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


def head_module(model: nn.Module) -> nn.Module:
    return model.head


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    head = {id(p) for p in head_module(model).parameters()}
    return [p for p in model.parameters() if id(p) not in head]


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict file, loaded without unpickling code (weights_only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def build_model(
    spec: ModelSpec, num_classes: int, dropout: float = 0.0, pretrained: str | Path | None = None
) -> nn.Module:
    """A fresh model for `num_classes`; with `pretrained`, every weight but the head's is loaded."""
    model = SmallCNN(num_classes, width=spec.width, dropout=dropout)
    if pretrained is not None:
        state = {k: v for k, v in load_state(pretrained).items() if not k.startswith("head.")}
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
    return model
