"""Priors over the top-level program z. A prior is a module whose call returns a distribution
with event shape (z_dim,); the model samples it at the site "z" inside the data plate, so the
site keeps its name and shape whatever the prior.

    normal  N(0, I), the paper's
    mog     a learned mixture of K diagonal Gaussians
    vamp    the VampPrior: the guide's posteriors at K learned pseudo-images, mixed equally
    flow    N(0, I) pushed through a learned masked autoregressive flow
"""
from __future__ import annotations

import contextlib

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
import torch.nn as nn

from .components import register_prior


class StandardNormalPrior(nn.Module):
    """z ~ N(0, I), the paper's prior."""

    def __init__(self, z_dim: int):
        super().__init__()
        self.z_dim = z_dim
        self.register_buffer("loc", torch.zeros(z_dim))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, torch.ones_like(self.loc)).to_event(1)


class MixturePrior(nn.Module):
    """A mixture of K diagonal Gaussians with learned weights, means and scales: room for
    clusters of programs (garment types, digits) that N(0, I) has to squeeze together."""

    def __init__(self, z_dim: int, components: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(components))
        self.locs = nn.Parameter(torch.randn(components, z_dim))
        self.log_scales = nn.Parameter(torch.zeros(components, z_dim))

    def forward(self) -> dist.Distribution:
        return dist.MixtureSameFamily(dist.Categorical(logits=self.logits),
                                      dist.Normal(self.locs, self.log_scales.exp()).to_event(1))


class VampPrior(nn.Module):
    """Tomczak & Welling (2018): p(z) = 1/K sum_k q(z | u_k) for K learned pseudo-images u_k.

    q is the diagonal Normal of the guide's encoder (for the flow and low-rank guides, their
    diagonal base). The pseudo-images pass through the encoder with batch norm in eval mode,
    so they do not move the running statistics that held-out images are encoded with.
    """

    def __init__(self, guide: nn.Module, components: int, image_size: int = 28):
        super().__init__()
        if not hasattr(guide, "diagonal"):
            raise ValueError("the vamp prior needs an amortized guide with a diagonal Normal q(z | x) "
                             "(resnet, resnet-lowrank or resnet-iaf)")
        # pseudo-images as logits: sigmoid keeps them in [0, 1] like the data
        self.pseudo_logits = nn.Parameter(0.5 * torch.randn(components, 1, image_size, image_size) - 1.0)
        self._guide = [guide]  # a plain reference: the guide's parameters belong to the guide

    def pseudo_images(self) -> torch.Tensor:
        return torch.sigmoid(self.pseudo_logits)

    def forward(self) -> dist.Distribution:
        guide = self._guide[0]
        with _batch_norm_in_eval_mode(guide):
            loc, scale = guide.diagonal(self.pseudo_images())
        weights = torch.zeros(loc.shape[0], device=loc.device)
        return dist.MixtureSameFamily(dist.Categorical(logits=weights), dist.Normal(loc, scale).to_event(1))


class FlowPrior(nn.Module):
    """N(0, I) pushed through ``layers`` affine autoregressive transforms, used in the masked
    autoregressive (MAF) direction so that log p(z) of a guide's sample takes one pass per layer."""

    def __init__(self, z_dim: int, layers: int, hidden: int):
        super().__init__()
        width = max(hidden, z_dim)
        self.flows = nn.ModuleList([T.affine_autoregressive(z_dim, hidden_dims=[width, width])
                                    for _ in range(layers)])
        for flow in self.flows:  # start at the identity, that is at N(0, I)
            last = flow.arn.layers[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        self.register_buffer("loc", torch.zeros(z_dim))

    def forward(self) -> dist.Distribution:
        base = dist.Normal(self.loc, torch.ones_like(self.loc)).to_event(1)
        return dist.TransformedDistribution(base, [flow.inv for flow in self.flows])


@contextlib.contextmanager
def _batch_norm_in_eval_mode(module: nn.Module):
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m in norms:
            m.train()


@register_prior("normal")
def _normal(config, guide=None):
    return StandardNormalPrior(config.z_dim)


@register_prior("mog")
def _mog(config, guide=None):
    return MixturePrior(config.z_dim, config.prior_components)


@register_prior("vamp")
def _vamp(config, guide=None):
    return VampPrior(guide, config.prior_components, config.image_size)


@register_prior("flow")
def _flow(config, guide=None):
    return FlowPrior(config.z_dim, config.flow_layers, config.encoder_hidden)
