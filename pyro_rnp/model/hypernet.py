"""The one shared hypernetwork H: program vector z -> the weights of a small recurrent machine.

H's trunk maps z (N, z_dim) to a code h (N, hidden); one bias-free head maps h to
every number of the generated program at once, value = h @ head (N, numel), about
1.33e5 numbers per program at the paper's sizes (the authors' five weight heads side
by side). Generated layer ``name`` is a block of that row, read as a weight matrix
and a bias, and applied to a batch as y = x W(z) + b(z), one matrix per program.

``PlainPrograms`` is that idea written plainly: autograd does the rest. It is the
reference: ``pyro_rnp.fast`` has a faster implementation of the same interface, which
a HyperNetwork uses only when it is given one (``HyperNetwork.make_programs``; see
``pyro_rnp.fast.accelerate``), and whose values and gradients the tests hold to this one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTION_DIM = 6


@dataclass(frozen=True)
class GeneratedLayer:
    """One generated linear layer x (i) -> y (o); with a bias its matrix has an extra last row."""
    name: str
    inputs: int
    outputs: int
    bias: bool
    group: str  # the authors' head that generates it; sets its Glorot scale

    @property
    def rows(self) -> int:
        return self.inputs + int(self.bias)

    @property
    def numel(self) -> int:
        return self.rows * self.outputs


def generated_layout(z_dim: int, hidden: int, embed: int, action_hidden: int, pixels: int) -> list[GeneratedLayer]:
    """Every layer of one generated program, grouped as the authors' five weight heads."""
    Z, L, E, AH, P, A = z_dim, hidden, embed, action_hidden, pixels, ACTION_DIM
    G = GeneratedLayer
    layout = [
        # patch encoder E: [patch -> L || action -> L] -> 2L -> L -> L -> E
        G("enc0", P, L, True, "encoder"), G("enc1", A, L, True, "encoder"), G("enc2", 2 * L, L, True, "encoder"),
        G("enc3", L, L, True, "encoder"), G("enc4", L, E, True, "encoder"),
    ]
    for rnn in ("state", "policy"):
        # Elman cell h' = elu([h, e] W + b), and its initial state h0 (a layer with no inputs: just a bias)
        layout += [G(rnn, Z + E, Z, True, rnn), G(f"{rnn}_h0", 0, Z, True, rnn)]
    layout += [
        # patch decoder D: Z -> L -> L -> L -> P (no bias, ReLU)
        G("dec0", Z, L, True, "patch_decoder"), G("dec1", L, L, True, "patch_decoder"),
        G("dec2", L, L, True, "patch_decoder"), G("dec3", L, P, False, "patch_decoder"),
        # action decoder T: Z -> AH -> AH -> AH -> 6 (no bias, sin)
        G("act0", Z, AH, True, "action_decoder"), G("act1", AH, AH, True, "action_decoder"),
        G("act2", AH, AH, True, "action_decoder"), G("act3", AH, A, False, "action_decoder"),
    ]
    return layout


class GeneratedPrograms(Protocol):
    """What a program executor needs of the weights of N generated programs."""

    n: int

    def apply(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Generated layer ``name`` on x (N, inputs) -> (N, outputs), each program its own weights."""

    def chain(self, names: tuple[str, ...], x: torch.Tensor, elu: bool, elu_first: bool,
              out: str | None = None) -> torch.Tensor:
        """Layers ``names`` in a row, ELU between them (and before the first if ``elu_first``; none
        when ``elu`` is False), then ``out`` ("relu", "sin" or None)."""

    def release(self) -> None:
        """Called once no more layers will be applied: the programs may free what they hold."""


class PlainPrograms:
    """The weights of N generated programs, plainly: value = h @ head, and views of it.

    Shapes: h (N, hidden), head (hidden, numel); layer ``name`` is a view of its block of
    value as a weight (N, inputs, outputs) and a bias (N, outputs), so autograd carries
    every gradient back through the views to h and the head.
    """

    def __init__(self, h: torch.Tensor, head: torch.Tensor, layout: list[GeneratedLayer]):
        self.n = h.shape[0]
        value = h @ head
        self.layers: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        offset = 0
        for layer in layout:
            block = value[:, offset:offset + layer.numel].view(self.n, layer.rows, layer.outputs)
            self.layers[layer.name] = (block[:, :layer.inputs], block[:, layer.inputs] if layer.bias else None)
            offset += layer.numel

    def apply(self, name: str, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.layers[name]
        y = torch.bmm(x.unsqueeze(1), weight).squeeze(1)
        return y if bias is None else y + bias

    def chain(self, names: tuple[str, ...], x: torch.Tensor, elu: bool, elu_first: bool,
              out: str | None = None) -> torch.Tensor:
        for k, name in enumerate(names):
            if elu and (k > 0 or elu_first):
                x = F.elu(x)
            x = self.apply(name, x)
        return x if out is None else torch.relu(x) if out == "relu" else torch.sin(x)

    def release(self) -> None:
        self.layers = {}


ProgramMaker = Callable[[torch.Tensor, torch.Tensor, list[GeneratedLayer]], GeneratedPrograms]


class HyperNetwork(nn.Module):
    """H: LayerNorm-ELU MLP trunk, one head for all generated layers, plus the a0 and x0 heads."""

    def __init__(self, z_dim: int, hidden: int = 64, embed: int = 32, action_hidden: int = 32, pixels: int = 784):
        super().__init__()
        # how generated programs are run: PlainPrograms, or a faster maker of the same interface
        # (pyro_rnp.fast.accelerate installs one); not a parameter, so not in the state dict
        self.make_programs: ProgramMaker = PlainPrograms
        L = hidden
        trunk = [nn.LayerNorm(z_dim), nn.Linear(z_dim, L)]
        for _ in range(4):
            trunk += [nn.LayerNorm(L), nn.ELU(), nn.Linear(L, L)]
        trunk += [nn.LayerNorm(L), nn.ELU()]
        self.trunk = nn.Sequential(*trunk)
        self.layout = generated_layout(z_dim, hidden, embed, action_hidden, pixels)
        # stored (hidden, numel) so that the forward and the head's gradient are plain row-major products
        self.head = nn.Parameter(torch.empty(L, sum(layer.numel for layer in self.layout)))
        self.initial_action = nn.Sequential(nn.Linear(L, L), nn.LayerNorm(L), nn.ELU(),
                                            nn.Linear(L, ACTION_DIM, bias=False))
        self.initial_patch = nn.Sequential(nn.Linear(L, L), nn.LayerNorm(L), nn.ELU(),
                                           nn.Linear(L, pixels, bias=False))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Glorot-uniform weights and zero biases, as the authors' framework initialises Dense layers.

        Each group of the head gets the bound of the authors' whole group head
        (fan-out ~65k for the encoder): that keeps the generated networks' gain
        small; PyTorch's default init makes it ~13x larger and training diverges.
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        group_size: dict[str, int] = {}
        for layer in self.layout:
            group_size[layer.group] = group_size.get(layer.group, 0) + layer.numel
        offset = 0
        with torch.no_grad():
            for layer in self.layout:
                bound = math.sqrt(6.0 / (self.head.shape[0] + group_size[layer.group]))
                self.head[:, offset:offset + layer.numel].uniform_(-bound, bound)
                offset += layer.numel

    @property
    def numel_per_program(self) -> int:
        return self.head.shape[1]

    def forward(self, z: torch.Tensor) -> tuple[GeneratedPrograms, torch.Tensor, torch.Tensor]:
        """(N, z_dim) -> (the N generated programs, a0 (N, 6) in [-1, 1], x0 (N, pixels) >= 0)."""
        h = self.trunk(z)
        programs = self.make_programs(h, self.head, self.layout)
        a0 = torch.sin(self.initial_action(h))
        x0 = torch.relu(self.initial_patch(h))
        return programs, a0, x0
