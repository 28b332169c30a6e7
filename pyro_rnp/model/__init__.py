"""The model layer: the RNP as the paper defines it, the baseline VAE, and the registry of models.

Read in this order:
    config.py        RNPConfig: every field that rebuilds a model and its training
    spatial.py       affine placement of a patch on a canvas, and its inverse
    hypernet.py      H: z -> the weights of a small program; PlainPrograms runs them
    program.py       the program executor: a tree of generated programs -> a canvas
    likelihoods.py   p(x | canvas)
    encoder.py       the ResNet that reads an image
    priors.py, guides.py, decoders.py, components.py
                     the swappable p(z), q(z | x) and decoders, registered by name
    vae.py           a VAE built from those components; the plain VAE baseline
    rnp.py           the RNP: that VAE with the program executor, its parses and parts
    parts.py         what a model placed on its canvas
    registry.py      the models by name, and what a model provides

Nothing here imports the speed layer (pyro_rnp.fast), click, matplotlib or tqdm.
"""
from .config import RNPConfig
from .parts import Parts
from .program import ProgramNode
from .registry import build_model, model_names, register_model, require
from .rnp import RNP
from .vae import VAE, ComponentVAE

__all__ = ["RNPConfig", "RNP", "VAE", "ComponentVAE", "Parts", "ProgramNode", "build_model", "model_names",
           "register_model", "require"]
