"""The speed layer: everything here exists only to make the model layer's computations faster.

Nothing in the model layer imports this package. A model runs its generated programs
the plain way (``pyro_rnp.model.hypernet.PlainPrograms``) until the fast path is put
on it, explicitly:

    from pyro_rnp.fast import accelerate
    accelerate(model)        # its hypernetworks now run FastPrograms

``TrainStep(..., fast=True)`` and ``load_run(..., fast=True)`` do this (their default);
pass ``fast=False`` to keep the plain path, or set ``PYRO_RNP_FAST=0`` for the commands.
The tests hold the fast path to the plain one on values and on every gradient.

    programs.py       FastPrograms: the generated layers through our own autograd Functions
    training_pass.py  TrainingPass: one step's deferred head gradient and recycled buffers
    layout.py         how the head's columns are cut for those products; the buffer pool
    onednn.py         the head's products in oneDNN on CPU, torch.mm elsewhere
    process.py        process-wide settings for the entry point that owns the process
"""
from __future__ import annotations

import contextlib

import torch

from ..model.hypernet import GeneratedLayer, HyperNetwork, PlainPrograms
from .process import prepare_process_for_training
from .programs import FastPrograms
from .training_pass import TrainingPass

__all__ = ["FastProgramPath", "FastPrograms", "TrainingPass", "accelerate", "program_path",
           "prepare_process_for_training"]


class FastProgramPath:
    """Makes a hypernetwork's programs on the fast path (installed as ``HyperNetwork.make_programs``).

    ``training_pass()`` opens one training step's pass: the programs made inside it share
    the step's deferred head gradient (see ``TrainingPass``).
    """

    def __init__(self):
        self.current: TrainingPass | None = None

    def __call__(self, h: torch.Tensor, head: torch.Tensor, layout: list[GeneratedLayer]) -> FastPrograms:
        return FastPrograms(h, head, layout, self.current)

    @contextlib.contextmanager
    def training_pass(self):
        if self.current is not None:
            raise RuntimeError("a training pass is already open on this model")
        self.current = TrainingPass()
        try:
            yield self.current
        finally:
            self.current.close()
            self.current = None


def accelerate(model: torch.nn.Module) -> torch.nn.Module:
    """Run every hypernetwork in ``model`` on the fast path (one shared FastProgramPath); returns
    ``model``. Models without a hypernetwork are returned unchanged."""
    path = program_path(model) or FastProgramPath()
    for module in model.modules():
        if isinstance(module, HyperNetwork):
            module.make_programs = path
    return model


def plain(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``accelerate``: every hypernetwork in ``model`` runs PlainPrograms again."""
    for module in model.modules():
        if isinstance(module, HyperNetwork):
            module.make_programs = PlainPrograms
    return model


def program_path(model: torch.nn.Module) -> FastProgramPath | None:
    """The fast path installed on ``model``'s hypernetworks, or None when they run the plain path."""
    for module in model.modules():
        if isinstance(module, HyperNetwork) and isinstance(module.make_programs, FastProgramPath):
            return module.make_programs
    return None
