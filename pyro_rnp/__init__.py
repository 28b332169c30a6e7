"""pyro_rnp: Recursive Neural Programs (Fisher & Rao, 2022) in Pyro."""
from .config import RNPConfig
from .model import RNP
from .program import ProgramNode

__version__ = "0.1.0"

__all__ = ["RNPConfig", "RNP", "ProgramNode", "load_run", "__version__"]


def load_run(run_dir, device="cpu"):
    """The trained RNP of a run folder, in eval mode."""
    from .runs import load_run as _load_run
    return _load_run(run_dir, device=device)
