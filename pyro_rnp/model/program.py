"""The program executor: runs a tree of hypernetwork-generated programs and composes their canvases.

Deterministic given z. Written once for any depth K: a program at level k runs
``steps`` times; each step emits a child state z_t and an action a_t; the child
is a decoded patch at level 1 and, above it, the canvas of program z_t run one
level down. Children are placed by their actions and summed.

Sizes: the top level draws on the image's canvas (``image_size``, 50 for Multi-MNIST);
every level below draws on a ``patch_size`` canvas (28), the size of the generated
patches, so the generated networks do not grow with the scene. Placement works on
[-1, 1] coordinates, so an action means the same whatever the two sizes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .hypernet import GeneratedPrograms, HyperNetwork
from .spatial import action_to_theta, crop, place


class GeneratedNetworks:
    """The small networks that H writes for a batch of N programs (one set per program)."""

    def __init__(self, programs: GeneratedPrograms, elu: bool, like: torch.Tensor):
        self.programs = programs
        self.layer = programs.apply
        self.elu = elu
        self.empty = like.new_empty(programs.n, 0)

    def initial_state(self, name: str) -> torch.Tensor:
        """h0 of the "state" or "policy" RNN."""
        return self.layer(f"{name}_h0", self.empty)

    def encode(self, patch: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """E(patch, action): the sensory input both RNNs read."""
        h = torch.cat([self.layer("enc0", patch), self.layer("enc1", action)], dim=1)
        return self.programs.chain(("enc2", "enc3", "enc4"), h, self.elu, elu_first=True)

    def rnn(self, name: str, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Elman cell h' = elu([h, e] W + b) for ``name`` in {"state", "policy"}."""
        return F.elu(self.layer(name, torch.cat([h, e], dim=1)))

    def decode_patch(self, z: torch.Tensor) -> torch.Tensor:
        """D(z): a patch (flattened, patch_size^2), non-negative: three hidden layers, the output layer, ReLU."""
        return self.programs.chain(("dec0", "dec1", "dec2", "dec3"), z, self.elu, elu_first=False, out="relu")

    def decode_action(self, h: torch.Tensor) -> torch.Tensor:
        """T(h): an action in [-1, 1]^6: three hidden layers, the output layer, sin."""
        return self.programs.chain(("act0", "act1", "act2", "act3"), h, self.elu, elu_first=False, out="sin")


@dataclass
class ProgramNode:
    """One level of a parsed image, for a batch: what a program drew and how.

    Shapes use ``*B`` for the batch shape of z and T for ``steps``:
      z (*B, z_dim); canvas (*B, 1, S, S), everything this program draws in its own frame (S: the
      image's side at the top level, the patch's below); theta (*B, T, 2, 3), where each child goes
      (canvas -> child coordinates, as affine_grid); patches (*B, T, 1, P, P), each child's output
      before placement (a decoded leaf patch at level 1, the child program's canvas above; P the
      patch side); placed (*B, T, 1, S, S), the same after placement (they sum to canvas);
      predictions (*B, T, 1, P, P) or None, the program's own
      guess D(z_t) of each child (levels above 1, kept for the part-level term);
      children: the T child programs (empty at level 1);
      child_z (*B, T, z_dim), the child program vectors z_t (at level 1: the leaf programs that the
      generated decoder D turns into ``patches``).
    """
    level: int
    z: torch.Tensor
    canvas: torch.Tensor
    theta: torch.Tensor
    patches: torch.Tensor
    placed: torch.Tensor
    predictions: torch.Tensor | None
    children: list["ProgramNode"] = field(default_factory=list)
    child_z: torch.Tensor | None = None

    def levels(self) -> list[list["ProgramNode"]]:
        """Nodes grouped by level, top first: levels()[0] == [self]."""
        out, frontier = [], [self]
        while frontier:
            out.append(frontier)
            frontier = [c for node in frontier for c in node.children]
        return out


@dataclass
class ExecutorOutput:
    canvas: torch.Tensor                 # (*B, 1, S, S), S the image's side
    part_term: torch.Tensor | None       # (*B,) sum over levels of the mean part error, if a target was given
    tree: ProgramNode | None             # the whole parse, if record=True


class ProgramExecutor(nn.Module):
    """The deterministic part of the generative model: z -> canvas, through H and a tree of programs."""

    def __init__(self, z_dim: int, depth: int = 2, steps: int = 4, hidden: int = 64, embed: int = 32,
                 action_hidden: int = 32, scale_offset: float = 3.3, generated_activation: str = "elu",
                 image_size: int = 28, patch_size: int = 28):
        super().__init__()
        self.z_dim, self.depth, self.steps = z_dim, depth, steps
        self.scale_offset = scale_offset
        self.image_size, self.patch_size = image_size, patch_size
        self.generated_activation = generated_activation
        self.hypernet = HyperNetwork(z_dim, hidden, embed, action_hidden, patch_size * patch_size)

    @classmethod
    def from_config(cls, config) -> "ProgramExecutor":
        return cls(config.z_dim, config.depth, config.steps, config.hidden, config.embed, config.action_hidden,
                   config.scale_offset, config.generated_activation, config.image_size, config.patch_size)

    def forward(self, z: torch.Tensor, target: torch.Tensor | None = None,
                part_error: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                record: bool = False) -> ExecutorOutput:
        """Run the program tree from top-level programs z (*B, z_dim).

        With ``target`` (broadcastable to (*B, 1, S, S)) and ``part_error(pred, target) -> (N,)``,
        every program above level 1 also scores its guess D(z_t) of each child against the
        target cropped by that child's action; those errors form ``part_term``.
        """
        batch_shape = z.shape[:-1]
        flat_z = z.reshape(-1, self.z_dim)
        flat_target = None
        if target is not None and part_error is not None and self.depth > 1:
            size = (self.image_size, self.image_size)
            flat_target = target.expand(*batch_shape, 1, *size).reshape(-1, 1, *size)
        canvas, part_term, tree = self._run(flat_z, self.depth, flat_target, part_error, record)
        canvas = canvas.reshape(*batch_shape, *canvas.shape[1:])
        if part_term is not None:
            part_term = part_term.reshape(batch_shape)
        if tree is not None:
            tree = _unflatten(tree, batch_shape)
        return ExecutorOutput(canvas, part_term, tree)

    def _side(self, level: int) -> int:
        """The side of the canvas a program at ``level`` draws on: the image's at the top, the patch's below."""
        return self.image_size if level == self.depth else self.patch_size

    def _run(self, z, level, target, part_error, record):
        n, size, side = z.shape[0], self.patch_size, self._side(level)
        programs, action, patch = self.hypernet(z)
        nets = GeneratedNetworks(programs, self.generated_activation == "elu", like=self.hypernet.head)
        h_state, h_policy = nets.initial_state("state"), nets.initial_state("policy")
        patch = patch.view(n, 1, size, size)
        canvas = 0.0
        errors, child_terms = [], []
        thetas, patches, placed_all, predictions, children, states = [], [], [], [], [], []
        for _ in range(self.steps):
            e = nets.encode(patch.flatten(1), action)
            h_state = nets.rnn("state", h_state, e)
            h_policy = nets.rnn("policy", h_policy, e)
            action = nets.decode_action(h_policy)
            theta = action_to_theta(action, self.scale_offset)
            prediction = None
            if level == 1:
                child_canvas, child_term, child_tree = nets.decode_patch(h_state).view(n, 1, size, size), None, None
            else:
                child_target = None
                if target is not None:
                    # the parent's own guess of its child's appearance, scored against the zoomed-in target
                    child_target = crop(target, theta, size).detach()
                    prediction = nets.decode_patch(h_state).view(n, 1, size, size)
                    errors.append(part_error(prediction, child_target))
                elif record:
                    prediction = nets.decode_patch(h_state).view(n, 1, size, size)
                child_canvas, child_term, child_tree = self._run(h_state, level - 1, child_target, part_error, record)
                if child_term is not None:
                    child_terms.append(child_term)
            placed = place(child_canvas, theta, side)
            canvas = canvas + placed
            # the next step reads what this child drew: the leaf patch at level 1, the child's canvas above
            patch = child_canvas
            if record:
                thetas.append(theta)
                patches.append(child_canvas)
                placed_all.append(placed)
                predictions.append(prediction)
                states.append(h_state)
                if child_tree is not None:
                    children.append(child_tree)
        part_term = None
        if errors:
            part_term = torch.stack(errors).mean(0)
            if child_terms:
                part_term = part_term + torch.stack(child_terms).mean(0)
        tree = None
        if record:
            tree = ProgramNode(
                level=level, z=z, canvas=canvas, theta=torch.stack(thetas, 1), patches=torch.stack(patches, 1),
                placed=torch.stack(placed_all, 1),
                predictions=None if predictions[0] is None else torch.stack(predictions, 1),
                children=children, child_z=torch.stack(states, 1))
        programs.release()
        return canvas, part_term, tree

    def draw(self, z: torch.Tensor, level: int | None = None) -> torch.Tensor:
        """The canvas (N, 1, S, S) that programs z (N, z_dim) draw when run at ``level`` (default:
        the top): how a part-level program looks on its own."""
        level = self.depth if level is None else level
        if not 1 <= level <= self.depth:
            raise ValueError(f"level must be between 1 and {self.depth}")
        return self._run(z, level, None, None, False)[0]


def _unflatten(node: ProgramNode, batch_shape) -> ProgramNode:
    def shape(t):
        return None if t is None else t.reshape(*batch_shape, *t.shape[1:])
    return ProgramNode(level=node.level, z=shape(node.z), canvas=shape(node.canvas), theta=shape(node.theta),
                       patches=shape(node.patches), placed=shape(node.placed), predictions=shape(node.predictions),
                       children=[_unflatten(c, batch_shape) for c in node.children], child_z=shape(node.child_z))
