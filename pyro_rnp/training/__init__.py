"""The training layer: one SVI step, the one loop over epochs, run folders, several processes.

    step.py         TrainStep (the model's ELBO, Adam, gradient clamp) and make_optimizer
    loop.py         TrainingLoop: epochs of steps, non-finite checks, progress bars
    runs.py         run folders: config, metrics, atomic checkpoints, load_run
    distributed.py  several processes under torchrun
"""
from .loop import EpochSummary, Position, TrainingError, TrainingLoop, state_finite
from .runs import RunError, load_run
from .step import TrainStep, make_optimizer

__all__ = ["EpochSummary", "Position", "RunError", "TrainStep", "TrainingError", "TrainingLoop", "load_run",
           "make_optimizer", "state_finite"]
