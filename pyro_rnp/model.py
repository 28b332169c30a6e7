"""The RNP as a Pyro model and guide.

model:  z ~ prior                                  (site "z", event shape (z_dim,), in the "data" plate)
        canvas = ProgramExecutor(z)                (deterministic, registered with pyro.module)
        factor "parts": -part_weight * part error  (the paper's part-level loss: a regulariser,
                                                    not part of the likelihood; absent when x is None)
        x ~ likelihood(canvas)                     (site "x", observed when x is given)
guide:  z ~ N(loc(x), scale(x))                    (ResNet encoder, registered with pyro.module)
"""
from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn

from .config import RNPConfig
from .encoder import ResNetEncoder
from .likelihoods import make_likelihood
from .priors import StandardNormalPrior
from .program import ExecutorOutput, ProgramExecutor, ProgramNode


class RNP(nn.Module):
    """Prior, program executor (the decoder) and amortized guide of a Recursive Neural Program."""

    def __init__(self, config: RNPConfig | None = None):
        super().__init__()
        self.config = config = config or RNPConfig()
        self.prior = StandardNormalPrior(config.z_dim)
        self.executor = ProgramExecutor.from_config(config)
        self.encoder = ResNetEncoder(config.z_dim, config.encoder_blocks, config.encoder_hidden)
        self.likelihood = make_likelihood(config.likelihood, config.likelihood_scale)

    # --- Pyro model and guide -------------------------------------------------------------
    def model(self, x: torch.Tensor | None = None, batch_size: int | None = None, part_term: bool = True):
        """Generative model for a batch x (B, 1, 28, 28); with x=None it generates batch_size images."""
        pyro.module("rnp_prior", self.prior)
        pyro.module("rnp_executor", self.executor)
        n = _batch_size(x, batch_size)
        with pyro.plate("data", n):
            z = pyro.sample("z", self.prior())
            score_parts = x is not None and part_term and self.config.part_weight > 0
            out = self.executor(z, target=x if score_parts else None,
                                part_error=self.likelihood.part_error if score_parts else None)
            if out.part_term is not None:
                pyro.factor("parts", -self.config.part_weight * out.part_term)
            obs = None if x is None else self.likelihood.observation(x)
            return pyro.sample("x", self.likelihood.distribution(out.canvas), obs=obs)

    def guide(self, x: torch.Tensor | None = None, batch_size: int | None = None, part_term: bool = True):
        """Amortized q(z | x): a diagonal Normal from the ResNet encoder."""
        if x is None:
            raise ValueError("the guide needs images x")
        pyro.module("rnp_encoder", self.encoder)
        loc, scale = self.encoder(x)
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    # --- analysis ---------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and scale of z for images x."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor, record: bool = True) -> ExecutorOutput:
        """Run programs z (*B, z_dim); with record=True the output holds the whole tree."""
        return self.executor(z, record=record)

    @torch.no_grad()
    def parse(self, x: torch.Tensor) -> ProgramNode:
        """The program tree of images x at the posterior mean of z (see ProgramNode for the fields)."""
        loc, _ = self.encode(x)
        return self.decode(loc).tree

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The likelihood's mean image at the posterior mean of z."""
        loc, _ = self.encode(x)
        return self.likelihood.mean(self.decode(loc, record=False).canvas)

    @torch.no_grad()
    def sample(self, n: int) -> ProgramNode:
        """Programs drawn from the prior, run with the whole tree recorded."""
        z = self.prior().sample((n,))
        return self.decode(z).tree


def _batch_size(x, batch_size):
    if x is not None:
        return x.shape[0]
    if batch_size is None:
        raise ValueError("pass images x or a batch_size")
    return batch_size
