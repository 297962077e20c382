"""The small CNN of the digits studies: three convolutional stages for 8x8 (or larger) images,
then a linear head."""

from __future__ import annotations

import torch
from torch import nn


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
