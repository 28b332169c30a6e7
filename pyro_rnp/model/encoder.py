"""The guide's network: a ResNet that reads an image and proposes q(z | x) = N(loc, scale)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .precision import full_precision


class BasicBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        return F.relu(x + self.body(x))


class ResNetEncoder(nn.Module):
    """Paper: five ResNet blocks of 32 channels, then four fully connected layers of 64 units."""

    def __init__(self, z_dim: int, blocks: int = 5, hidden: int = 64, channels: int = 32, image_size: int = 28):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 5), nn.ReLU(), nn.MaxPool2d(2),            # 28 -> 24 -> 12 (50 -> 46 -> 23)
            *[BasicBlock(channels) for _ in range(blocks)],
            nn.Conv2d(channels, 16, 5), nn.ReLU(), nn.Flatten())              # 12 -> 8 (23 -> 19)
        side = (image_size - 4) // 2 - 4
        layers, width = [], 16 * side * side
        for _ in range(4):
            layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ELU()]
            width = hidden
        self.mlp = nn.Sequential(*layers)
        self.loc = nn.Linear(hidden, z_dim)
        self.log_scale = nn.Linear(hidden, z_dim)
        # channels-last convolutions: faster on CPU (see the benchmark's docs)
        self.features.to(memory_format=torch.channels_last)

    def features_of(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden layer (B, hidden): what other guides can condition on."""
        return self.mlp(self.features(x.contiguous(memory_format=torch.channels_last)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.features_of(x))

    def heads(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale) of q(z | x) from the features, in at least float32 whatever the features were
        computed in: the guide's location and noise keep full precision under autocast."""
        h = full_precision(h)
        with torch.autocast(h.device.type, enabled=False):
            return self.loc(h), self.log_scale(h).exp()
