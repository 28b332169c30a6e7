"""pyro_rnp: Recursive Neural Programs (Fisher & Rao, 2022) in Pyro, and the models they are compared with.

The package is in layers, each importing only the ones before it:

    data/      datasets as tensors; atomic file writes
    model/     the models as Pyro models and guides, the plain program path, the model registry
    fast/      speed only: the same computations as model/, faster (tests hold them equal)
    training/  the SVI step, the one training loop, run folders, several processes
    analysis/  evaluation, predictive checks, figures, program space, transfer, per-image fits
    fit.py, evaluate.py, ppc.py, figures.py, transfer.py, export.py, bench.py, gpucheck.py
               the commands (``python -m pyro_rnp.fit`` ...), thin: options, then one call each
"""
import sys as _sys

from .model import RNP, VAE, Parts, ProgramNode, RNPConfig, build_model, model_names
from .model import components as _components
from .model import guides as _guides
from .model import priors as _priors

__version__ = "0.1.0"

__all__ = ["RNPConfig", "RNP", "VAE", "Parts", "ProgramNode", "build_model", "model_names", "load_run",
           "__version__"]

# import paths from before the package had layers, kept so that users' plugin files
# (``from pyro_rnp.components import register_guide``) keep working
for _old, _module in (("components", _components), ("guides", _guides), ("priors", _priors)):
    _sys.modules.setdefault(f"{__name__}.{_old}", _module)


def load_run(run_dir, device="cpu", fast: bool = True, weights_only: bool = False):
    """The trained model of a run folder (an RNP, or whichever model the run trained), in eval mode: from
    its checkpoint.pt, or its half-precision weights.pt (``weights_only``, or where that is all it holds)."""
    from .training.runs import load_run as _load_run
    return _load_run(run_dir, device=device, fast=fast, weights_only=weights_only)
