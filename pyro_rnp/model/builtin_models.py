"""The models that ship with pyro_rnp, registered by name."""
from __future__ import annotations

from .air import AIR
from .config import RNPConfig
from .dmvae import DMVAE
from .registry import register_model
from .rnp import RNP
from .sparse_andor import SparseAndOr
from .vae import VAE


@register_model("rnp", "Recursive Neural Program: a tree of hypernetwork-generated programs (the paper's)",
                capabilities=("guide", "parts", "programs"))
def _rnp(config: RNPConfig, **modules) -> RNP:
    return RNP(config, **modules)


@register_model("vae", "the baseline VAE: the RNP's prior, guide and likelihood with a plain MLP decoder",
                capabilities=("guide",))
def _vae(config: RNPConfig, **modules) -> VAE:
    return VAE(config, **modules)


@register_model("air", "AIR (Eslami et al. 2016) as Pyro's example: up to max_parts objects, z_pres/z_where/z_what, "
                "an LSTM guide with learned baselines", capabilities=("guide", "parts", "count"))
def _air(config: RNPConfig, **modules) -> AIR:
    if modules:
        raise ValueError(f"the air model has no swappable components (got {', '.join(modules)})")
    return AIR(config)


@register_model("dmvae", "DM-VAE (Min et al.): AIR's sequence of parts, each drawn from a learned memory of slots "
                "with Concrete-relaxed addresses", capabilities=("guide", "parts", "count", "memory"))
def _dmvae(config: RNPConfig, **modules) -> DMVAE:
    if modules:
        raise ValueError(f"the dmvae model has no swappable components (got {', '.join(modules)})")
    return DMVAE(config)


@register_model("sparse-andor", "the sparse AND-OR generator (Xing et al.): a top-k sparse convolutional generator "
                "learned without an encoder by alternating back-propagation (Langevin inference)",
                capabilities=("guide", "basis"))
def _sparse_andor(config: RNPConfig, **modules) -> SparseAndOr:
    if modules:
        raise ValueError(f"the sparse-andor model has no swappable components (got {', '.join(modules)})")
    return SparseAndOr(config)
