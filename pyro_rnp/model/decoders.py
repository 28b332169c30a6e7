"""Decoders from the top-level program z to a canvas.

    rnp  the program executor: a tree of hypernetwork-generated programs (the paper's)
    mlp  a plain MLP with the same latent size, likelihood, encoder, prior and training loop:
         the baseline VAE that measures what RNP's structure costs or gains in likelihood
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .components import register_decoder
from .program import ExecutorOutput, ProgramExecutor


class MLPDecoder(nn.Module):
    """z -> hidden -> hidden -> 28x28, ELU between layers. The output goes through softplus:
    a non-negative canvas, as RNP's sum of ReLU patches is, so both likelihoods read it the same way."""

    def __init__(self, z_dim: int, hidden: int = 512, image_size: int = 28):
        super().__init__()
        self.z_dim, self.image_size = z_dim, image_size
        self.net = nn.Sequential(nn.Linear(z_dim, hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU(),
                                 nn.Linear(hidden, image_size * image_size))

    def forward(self, z: torch.Tensor, target=None, part_error=None, record: bool = False) -> ExecutorOutput:
        canvas = F.softplus(self.net(z)).unflatten(-1, (1, self.image_size, self.image_size))
        return ExecutorOutput(canvas, part_term=None, tree=None)


@register_decoder("rnp")
def _rnp(config):
    return ProgramExecutor.from_config(config)


@register_decoder("mlp")
def _mlp(config):
    return MLPDecoder(config.z_dim, config.decoder_hidden, config.image_size)
