"""The models that ship with pyro_rnp, registered by name."""
from __future__ import annotations

from .config import RNPConfig
from .registry import register_model
from .rnp import RNP
from .vae import VAE


@register_model("rnp", "Recursive Neural Program: a tree of hypernetwork-generated programs (the paper's)",
                capabilities=("guide", "parts", "programs"))
def _rnp(config: RNPConfig, **modules) -> RNP:
    return RNP(config, **modules)


@register_model("vae", "the baseline VAE: the RNP's prior, guide and likelihood with a plain MLP decoder",
                capabilities=("guide",))
def _vae(config: RNPConfig, **modules) -> VAE:
    return VAE(config, **modules)
