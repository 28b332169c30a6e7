"""The RNP as a Pyro model and guide.

model:  z ~ prior                                  (site "z", event shape (z_dim,), in the "data" plate)
        canvas = ProgramExecutor(z)                (deterministic, registered with pyro.module)
        factor "parts": -part_weight * part error  (the paper's part-level loss: a regulariser,
                                                    not part of the likelihood; absent when x is None)
        x ~ likelihood(canvas)                     (site "x", observed when x is given)
guide:  z ~ q(z | x)                               (the guide module, registered with pyro.module;
                                                    the paper's is the ResNet encoder's diagonal Normal)

The model and guide functions are ComponentVAE's (vae.py): the program executor is its
decoder and reports the part term. What an RNP adds is its program tree: ``parse``,
``sample_programs`` and ``parts``.
"""
from __future__ import annotations

import torch

from .parts import Parts
from .program import ProgramNode
from .spatial import patch_box
from .vae import ComponentVAE


class RNP(ComponentVAE):
    """Prior, decoder (the program executor) and guide of a Recursive Neural Program.

    ``prior``, ``guide`` and ``decoder`` default to the components named in the config; a module
    passed here replaces that component (see ComponentVAE).
    """

    @torch.no_grad()
    def parse(self, x: torch.Tensor) -> ProgramNode:
        """The program tree of images x at the posterior mean of z (see ProgramNode for the fields)."""
        self._need_programs("a parse")
        return self.decode(self.encode(x)).tree

    @torch.no_grad()
    def sample_programs(self, n: int) -> ProgramNode:
        """Programs drawn from the prior, run with the whole tree recorded."""
        self._need_programs("sampled parts")
        return self.decode(self.sample_z(n)).tree

    @torch.no_grad()
    def parts(self, x: torch.Tensor) -> Parts:
        """The top-level parts of images x at the posterior mean of z: the children of the top program."""
        return self.parts_of(self.parse(x))

    def parts_of(self, tree: ProgramNode) -> Parts:
        """The top-level parts of a parse or of sampled programs."""
        steps = tree.placed.shape[1]
        return Parts(canvas=self.likelihood.mean(tree.canvas), placed=tree.placed,
                     labels=[f"part {t + 1}" for t in range(steps)],
                     boxes=patch_box(tree.theta, tree.canvas.shape[-1]))

    def _need_programs(self, what: str) -> None:
        if not self.has_parts:
            raise ValueError(f"the {self.config.decoder} decoder draws no parts, so there is no {what}; "
                             "use a model whose decoder is the program executor (--model rnp)")
