"""Variational families q(z | x) for the top-level program.

    resnet          the ResNet encoder's diagonal Normal (the paper's)
    resnet-lowrank  the same encoder, plus a rank-r factor: a correlated Normal
    resnet-iaf      the diagonal Normal, then inverse autoregressive flow steps conditioned
                    on the encoder's features (Pyro's conditional transforms)
    autonormal      one Normal per image for a fixed set of images (Pyro's AutoNormal): no
                    encoder, so no amortization gap; for fitting a few images with a trained,
                    frozen decoder ("fit these 10 images as programs")

A guide returns a distribution; the model's guide function does the sampling, at the
site "z" inside the "data" plate. See components.py for the protocol.
"""
from __future__ import annotations

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import pyro.poutine as poutine
import torch
import torch.nn as nn
from pyro.infer.autoguide import AutoNormal, init_to_value

from .components import register_guide
from .encoder import ResNetEncoder
from .precision import full_precision


class DiagonalNormalGuide(ResNetEncoder):
    """q(z | x) = N(loc(x), diag scale(x)^2) from the ResNet encoder."""

    def diagonal(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale), each (B, z_dim), in at least float32."""
        return self.heads(self.features_of(x))

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        loc, scale = self.diagonal(x)
        return dist.Normal(loc, scale).to_event(1)

    def point(self, x: torch.Tensor) -> torch.Tensor:
        return self.diagonal(x)[0]


class LowRankNormalGuide(DiagonalNormalGuide):
    """q(z | x) = N(loc(x), F(x) F(x)^T + diag scale(x)^2) with F of rank ``rank``: lets the
    posterior say that two program coordinates move together."""

    def __init__(self, z_dim: int, rank: int, **encoder):
        super().__init__(z_dim, **encoder)
        self.rank = rank
        self.cov_factor = nn.Linear(self.loc.in_features, z_dim * rank)
        nn.init.zeros_(self.cov_factor.weight)  # starts as the diagonal guide
        nn.init.zeros_(self.cov_factor.bias)

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        h = self.features_of(x)
        loc, scale = self.heads(h)
        with torch.autocast(loc.device.type, enabled=False):
            factor = self.cov_factor(h.to(loc.dtype)).unflatten(-1, (loc.shape[-1], self.rank))
            return FullPrecisionLowRankNormal(loc, factor, scale.pow(2))


class FullPrecisionLowRankNormal(dist.LowRankMultivariateNormal):
    """LowRankMultivariateNormal whose sampling and density never run under autocast: its Cholesky
    factor has no bfloat16 kernel on CUDA, and its products would lose the location's precision."""

    def rsample(self, sample_shape=torch.Size()):
        with torch.autocast(self.loc.device.type, enabled=False):
            return super().rsample(sample_shape)

    def log_prob(self, value):
        with torch.autocast(self.loc.device.type, enabled=False):
            return super().log_prob(full_precision(value))


class IAFGuide(DiagonalNormalGuide):
    """The diagonal Normal pushed through ``flow_steps`` affine autoregressive (IAF) steps whose
    shifts and scales also read the encoder's features: a non-Gaussian q(z | x).

    point(x) is the flow applied to the base mean (the flow's image of the base mode)."""

    def __init__(self, z_dim: int, flow_steps: int, **encoder):
        super().__init__(z_dim, **encoder)
        context = self.loc.in_features
        width = max(context, z_dim)
        self.flows = nn.ModuleList([T.conditional_affine_autoregressive(z_dim, context, hidden_dims=[width, width])
                                    for _ in range(flow_steps)])
        for flow in self.flows:  # start at the identity, that is at the diagonal guide
            last = flow.nn.layers[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def _parts(self, x):
        h = self.features_of(x)
        loc, scale = self.heads(h)
        return loc, scale, [flow.condition(h) for flow in self.flows]

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        loc, scale, transforms = self._parts(x)
        return dist.TransformedDistribution(dist.Normal(loc, scale).to_event(1), transforms)

    def point(self, x: torch.Tensor) -> torch.Tensor:
        z, _, transforms = self._parts(x)
        for t in transforms:
            z = t(z)
        return z


class AutoNormalGuide(nn.Module):
    """One Normal per image for the fixed images it was built for, held by Pyro's AutoNormal.

    The images are kept, and a batch is matched to them row by row, so any subset in any
    order works (minibatches, evaluation); an image it was not fitted to is refused.
    """

    def __init__(self, images: torch.Tensor, z_dim: int, init_loc: torch.Tensor | None = None,
                 init_scale: float | torch.Tensor = 0.1):
        super().__init__()
        self.register_buffer("images", images.detach().clone())
        n = images.shape[0]

        def prototype():  # the site AutoNormal learns: z for each of the n images
            with pyro.plate("data", n):
                pyro.sample("z", dist.Normal(torch.zeros(n, z_dim), 1.0).to_event(1))

        init = init_to_value(values={"z": init_loc.detach().clone()}) if init_loc is not None else None
        per_image_scale = torch.is_tensor(init_scale)
        self.auto = AutoNormal(prototype, init_scale=0.1 if per_image_scale else init_scale,
                               **({"init_loc_fn": init} if init is not None else {}))
        # create the parameters now (so a checkpoint can be loaded into them), in a private
        # param store so that another run's "locs.z" in the global one is never picked up
        with pyro.get_param_store().scope(), poutine.block():
            self.auto()
        if per_image_scale:
            self.auto.scales.z = init_scale.detach().clone()

    @property
    def fitted_images(self) -> torch.Tensor:
        return self.images

    def index_of(self, x: torch.Tensor) -> torch.Tensor:
        flat, known = x.flatten(1), self.images.flatten(1)
        match = (flat[:, None, :] == known[None, :, :]).all(-1)  # (B, N)
        found = match.any(1)
        if not bool(found.all()):
            missing = int((~found).sum())
            raise ValueError(f"the autonormal guide holds {known.shape[0]} fitted images; {missing} of these "
                             f"{x.shape[0]} are not among them (it has no encoder for new images)")
        return match.float().argmax(1)

    def _loc_scale(self, x):
        loc, scale = self.auto._get_loc_and_scale("z")
        index = self.index_of(x)
        return loc[index], scale[index]

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        loc, scale = self._loc_scale(x)
        return dist.Normal(loc, scale).to_event(1)

    def point(self, x: torch.Tensor) -> torch.Tensor:
        return self._loc_scale(x)[0]


def _encoder_sizes(config) -> dict:
    return dict(blocks=config.encoder_blocks, hidden=config.encoder_hidden, image_size=config.image_size)


@register_guide("resnet")
def _resnet(config):
    return DiagonalNormalGuide(config.z_dim, **_encoder_sizes(config))


@register_guide("resnet-lowrank")
def _lowrank(config):
    return LowRankNormalGuide(config.z_dim, config.guide_rank, **_encoder_sizes(config))


@register_guide("resnet-iaf")
def _iaf(config):
    return IAFGuide(config.z_dim, config.flow_layers, **_encoder_sizes(config))


@register_guide("autonormal")
def _autonormal(config, images: torch.Tensor | None = None, init_loc: torch.Tensor | None = None):
    if images is None:  # rebuilt from a run folder: the checkpoint fills in the images and parameters
        images = torch.zeros(config.limit or 10, 1, config.image_size, config.image_size)
    return AutoNormalGuide(images, config.z_dim, init_loc)
