"""A VAE assembled from named components, and the plain VAE baseline (``--model vae``).

model:  z ~ prior                       (site "z", event shape (z_dim,), in the "data" plate)
        canvas = decoder(z)             (deterministic, registered with pyro.module)
        x ~ likelihood(canvas)          (site "x", observed when x is given)
guide:  z ~ q(z | x)                    (the guide module, registered with pyro.module)

Prior, guide and decoder are swappable components (components.py): by name in the
config (``RNPConfig(prior="vamp")``), or as modules (``RNP(config, guide=MyGuide())``).
Whatever they are, the latent site is "z" in the "data" plate. The RNP (rnp.py) is
this model with the program executor as its decoder and a part-level regulariser.
"""
from __future__ import annotations

import pyro
import torch
import torch.nn as nn

from . import components
from .config import RNPConfig
from .likelihoods import make_likelihood, register as register_likelihood
from .program import ExecutorOutput


class ComponentVAE(nn.Module):
    """Prior, decoder and guide of a VAE over images, built from the components a config names.

    ``prior``, ``guide`` and ``decoder`` default to the components named in the config; a module
    passed here replaces that component (its name in the config is then only a label). The guide
    module is ``self.encoder`` and the decoder ``self.executor`` (checkpoint names).
    Implements the model protocol of registry.py (objective "trace_elbo").
    """

    objective = "trace_elbo"

    def __init__(self, config: RNPConfig | None = None, prior: nn.Module | None = None,
                 guide: nn.Module | None = None, decoder: nn.Module | None = None):
        super().__init__()
        self.config = config = config or RNPConfig()
        for plugin in config.plugins:
            components.import_plugin(plugin)
        # built in this order so the paper's model initialises as it always has for a given seed
        self.executor = decoder if decoder is not None else components.build("decoder", config.decoder, config)
        self.encoder = guide if guide is not None else components.build("guide", config.guide, config)
        self.prior = prior if prior is not None else components.build("prior", config.prior, config,
                                                                     guide=self.encoder)
        self.likelihood = make_likelihood(config.likelihood, config.likelihood_scale, config.image_size)

    @property
    def has_parts(self) -> bool:
        """Whether the decoder draws a program tree (the mlp decoder does not)."""
        return hasattr(self.executor, "hypernet")

    # --- Pyro model and guide -------------------------------------------------------------
    def model(self, x: torch.Tensor | None = None, batch_size: int | None = None, part_term: bool = True):
        """Generative model for a batch x (B, 1, 28, 28); with x=None it generates batch_size images.
        ``part_term=False`` leaves out the part-level regulariser (a decoder without parts has none)."""
        pyro.module("rnp_prior", self.prior)
        pyro.module("rnp_executor", self.executor)
        register_likelihood(self.likelihood)
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
        """q(z | x) from the guide module (the paper's: a diagonal Normal from the ResNet encoder)."""
        if x is None:
            raise ValueError("the guide needs images x")
        pyro.module("rnp_encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("z", self.encoder.posterior(x))

    # --- the model protocol's analysis methods ----------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The guide's single z per image (B, z_dim): the posterior mean for the Normal guides."""
        return self.encoder.point(x)

    def decode(self, z: torch.Tensor, record: bool = True) -> ExecutorOutput:
        """Run the decoder on z (*B, z_dim); with record=True a program executor keeps the whole tree."""
        return self.executor(z, record=record)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The likelihood's mean image (B, 1, 28, 28) at the guide's point estimate of z."""
        return self.likelihood.mean(self.decode(self.encode(x), record=False).canvas)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """The likelihood's mean image (n, 1, 28, 28) of n programs drawn from the prior."""
        return self.likelihood.mean(self.decode(self.sample_z(n), record=False).canvas)

    @torch.no_grad()
    def sample_z(self, n: int) -> torch.Tensor:
        """n latent vectors from the prior, (n, z_dim)."""
        return self.prior().sample((n,))


class VAE(ComponentVAE):
    """The baseline VAE: the same latent size, prior, guide, likelihood and training as the RNP,
    with a plain MLP decoder (config.decoder "mlp") instead of a program tree. It measures what
    the RNP's structure costs or gains in likelihood."""


def _batch_size(x, batch_size):
    if x is not None:
        return x.shape[0]
    if batch_size is None:
        raise ValueError("pass images x or a batch_size")
    return batch_size
