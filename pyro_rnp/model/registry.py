"""The models the harness trains, by name (``fit --model NAME``), and what a model provides.

A model is a ``torch.nn.Module`` built from a run's config by ``build_model(config)``
(the builder registered under ``config.model``). Every model provides:

    config                         the RNPConfig it was built from
    likelihood                     its observation model (``name``, ``mean(canvas)``)
    objective                      how it trains: "trace_elbo" (Pyro's Trace_ELBO), or
                                   "tracegraph_elbo" (TraceGraph_ELBO: discrete latents
                                   such as AIR's z_pres, with learned baselines); a model
                                   trained without a guide names its own inference
    model(x=None, batch_size=None) the Pyro model: images x (B, 1, H, W) observed at site
                                   "x"; with x=None it generates batch_size images
    reconstruct(x) -> (B, 1, H, W) the likelihood's mean image given inferred latents
    sample(n) -> (n, 1, H, W)      the likelihood's mean image of latents from the prior
    particle_plate (optional)      False for a model whose guide cannot take an outer plate of
                                   particles at dim -2: evaluation then repeats the batch
    evaluation_batch (optional)    images evaluated at once, for a model whose guide's cost is an
                                   inner loop per image rather than the importance samples

and, where it has them (its entry's ``capabilities`` say which):

    "guide"     guide(x): the Pyro guide (amortized q(latents | x)); evaluate, ppc and
                transfer need it; a model with one latent vector per image also gives
                encode(x) -> (B, z_dim), its point estimate (the linear probes read it)
    "parts"     parts(x) -> Parts: the pieces it placed on the canvas and what each is
                (coloured figures)
    "programs"  parse(x) -> ProgramNode, sample_programs(n): program trees (parse,
                clusters, interpolation, library and t-SNE figures)
    "count"     count(x) -> (B,) int64: how many objects the model finds in each image
                (AIR's z_pres), for count accuracy on Multi-MNIST
    "basis"     basis_functions(layer, images) -> (C, 1, H, W): what one active unit of a generator
                layer draws (the sparse AND-OR generator's dictionary)
    "memory"    slot_drawings(samples) -> (K, samples, 1, W, W) and address(x) -> (B, T), the slot
                each step reads or -1 (DM-VAE's memory figure)

``load_run`` rebuilds whichever model a run trained; every command checks the
capabilities it needs with ``require`` and refuses in one line naming the models
that have them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from .config import RNPConfig

CAPABILITIES = ("guide", "parts", "programs", "count", "memory", "basis")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    build: Callable[[RNPConfig], nn.Module]
    description: str
    capabilities: frozenset[str]


_MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, description: str, capabilities: tuple[str, ...] = ()):
    """Decorator: ``build(config) -> nn.Module`` implementing the protocol above, under ``name``."""
    unknown = set(capabilities) - set(CAPABILITIES)
    if unknown:
        raise ValueError(f"unknown capabilities {sorted(unknown)}; choose from {', '.join(CAPABILITIES)}")

    def decorate(build):
        _MODELS[name] = ModelEntry(name, build, description, frozenset(capabilities))
        return build
    return decorate


def model_names() -> list[str]:
    _load_builtins()
    return list(_MODELS)


def model_entry(name: str) -> ModelEntry:
    _load_builtins()
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(_MODELS)}") from None


def build_model(config: RNPConfig, **modules) -> nn.Module:
    """The model ``config.model`` built from ``config`` (``modules``: components to use instead of
    the named ones, for the models built from components)."""
    return model_entry(config.model).build(config, **modules)


def has(model: nn.Module, capability: str) -> bool:
    """Whether ``model`` has ``capability`` (its entry says so, and for parts and programs its
    decoder really draws them: an rnp built around a user's decoder may not)."""
    entry = model_entry(model.config.model)
    if capability not in entry.capabilities:
        return False
    return capability == "guide" or getattr(model, "has_parts", True)


def require(model: nn.Module, capability: str, what: str) -> None:
    """Raise ValueError, in one line, if ``model`` lacks ``capability``; ``what`` is what needs it."""
    if has(model, capability):
        return
    able = [entry.name for entry in _MODELS.values() if capability in entry.capabilities]
    yours = model.config.model + (f" with decoder {model.config.decoder}" if model.config.model in able else "")
    raise ValueError(f"{what} needs a model with {_PHRASES[capability]}, and this model ({yours}) has none; "
                     f"it works on: {', '.join(able) or 'no registered model'}")


_PHRASES = {"guide": "a guide q(z | x)", "parts": "parts on its canvas", "programs": "program trees"}


def _load_builtins() -> None:
    from . import builtin_models  # noqa: F401  (registers rnp and vae)
