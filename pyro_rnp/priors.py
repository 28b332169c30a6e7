"""Priors over the top-level program z. A prior is a module whose call returns a distribution
with event shape (z_dim,); the model samples it at the site "z" inside the data plate."""
from __future__ import annotations

import torch
import torch.nn as nn
import pyro.distributions as dist


class StandardNormalPrior(nn.Module):
    """z ~ N(0, I), the paper's prior."""

    def __init__(self, z_dim: int):
        super().__init__()
        self.z_dim = z_dim
        self.register_buffer("loc", torch.zeros(z_dim))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, torch.ones_like(self.loc)).to_event(1)
