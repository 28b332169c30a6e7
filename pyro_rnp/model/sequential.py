"""What AIR (air.py) and DM-VAE (dmvae.py) share: a sequence of up to T objects, each present or not
(z_pres, once 0 always 0), placed on the canvas by an affine map from z_where.

A subclass defines ``_infer(x, sample)`` (the guide's recurrence, drawing each site with
``sample(name, distribution, infer=None)``), ``draw(latents)`` -> (canvas, placed),
``sample_latents(n)`` and ``theta(z_where)``; this class turns those into the model protocol's
analysis methods (registry.py), each read at the guide's modes.
"""
from __future__ import annotations

import pyro.distributions as dist
import torch
import torch.nn as nn
import torch.nn.functional as F
from pyro import poutine

from .parts import Parts
from .spatial import patch_box


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers of the given sizes with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if k < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def mode(name: str, distribution: dist.Distribution, infer: dict | None = None) -> torch.Tensor:
    """A site's mode, as a stand-in for ``pyro.sample`` in ``_infer``: 1 where a Bernoulli's probability
    passes 1/2, the most likely category of a one-hot categorical, the mean of anything else."""
    base = distribution
    while hasattr(base, "base_dist"):
        base = base.base_dist
    if isinstance(base, dist.Bernoulli):
        return (base.probs > 0.5).to(base.probs.dtype)
    if isinstance(base, dist.OneHotCategorical):
        return F.one_hot(base.probs.argmax(-1), base.probs.shape[-1]).to(base.probs.dtype)
    return base.mean


class SequentialPartsModel(nn.Module):
    """Base of the sequential models: steps T, canvas side C; latents with z_pres (N, T) and z_where (N, T, .)."""

    objective = "trace_elbo"
    particle_plate = False  # the guide's recurrence takes (N, ...) tensors: evaluation repeats the batch
    steps: int
    canvas_size: int

    @torch.no_grad()
    def infer_modes(self, x: torch.Tensor):
        """The guide's recurrence fed its own modes (``mode``), with hard sites (eval mode)."""
        was_training = self.training
        self.eval()
        try:
            with poutine.block():
                return self._infer(x, mode)
        finally:
            self.train(was_training)

    def count(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) the number of objects the guide finds in each image (at its modes)."""
        return self.infer_modes(x).z_pres.sum(1).long()

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.likelihood.mean(self.draw(self.infer_modes(x))[0])

    @torch.no_grad()
    def parts(self, x: torch.Tensor) -> Parts:
        latents = self.infer_modes(x)
        canvas, placed = self.draw(latents)
        return Parts(self.likelihood.mean(canvas), placed, [f"object {t + 1}" for t in range(self.steps)],
                     latents.z_pres.bool(), patch_box(self.theta(latents.z_where), self.canvas_size))

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        return self.likelihood.mean(self.draw(self.sample_latents(n))[0])

    def prior_presence(self, n: int, device) -> torch.Tensor:
        """(n, T) z_pres drawn from the prior: each step present with probability rho if the last was."""
        return (torch.rand(n, self.steps, device=device) < self.config.z_pres_prior).float().cumprod(1)
