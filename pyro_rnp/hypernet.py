"""The one shared hypernetwork H: program vector z -> weights of a small recurrent machine.

Every generated tensor has a head of its own (a bias-free linear map from H's
64-d trunk output), so no big output is ever sliced into autograd views: the
backward of a slice zero-fills a full-size gradient, which costs about a third
of a straightforward port's step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

ACTION_DIM = 6


@dataclass(frozen=True)
class GeneratedTensor:
    name: str
    shape: tuple[int, ...]
    group: str  # the authors' head that generates it; sets its Glorot scale

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def generated_layout(z_dim: int, hidden: int, embed: int, action_hidden: int, pixels: int) -> list[GeneratedTensor]:
    """Every tensor of one generated program, grouped as the authors' five weight heads."""
    Z, L, E, AH, P, A = z_dim, hidden, embed, action_hidden, pixels, ACTION_DIM
    T = GeneratedTensor
    layout = [
        # patch encoder E: [patch -> L || action -> L] -> 2L -> L -> L -> E
        T("enc0_w", (P, L), "encoder"), T("enc0_b", (L,), "encoder"),
        T("enc1_w", (A, L), "encoder"), T("enc1_b", (L,), "encoder"),
        T("enc2_w", (2 * L, L), "encoder"), T("enc2_b", (L,), "encoder"),
        T("enc3_w", (L, L), "encoder"), T("enc3_b", (L,), "encoder"),
        T("enc4_w", (L, E), "encoder"), T("enc4_b", (E,), "encoder"),
    ]
    for rnn in ("state", "policy"):
        # Elman cell h' = elu([h, e] W + b); W stacks the recurrent and the input weights
        layout += [T(f"{rnn}_w", (Z + E, Z), rnn), T(f"{rnn}_b", (Z,), rnn), T(f"{rnn}_h0", (Z,), rnn)]
    layout += [
        # patch decoder D: Z -> L -> L -> L -> P (no bias, ReLU)
        T("dec0_w", (Z, L), "patch_decoder"), T("dec0_b", (L,), "patch_decoder"),
        T("dec1_w", (L, L), "patch_decoder"), T("dec1_b", (L,), "patch_decoder"),
        T("dec2_w", (L, L), "patch_decoder"), T("dec2_b", (L,), "patch_decoder"),
        T("dec3_w", (L, P), "patch_decoder"),
        # action decoder T: Z -> AH -> AH -> AH -> 6 (no bias, sin)
        T("act0_w", (Z, AH), "action_decoder"), T("act0_b", (AH,), "action_decoder"),
        T("act1_w", (AH, AH), "action_decoder"), T("act1_b", (AH,), "action_decoder"),
        T("act2_w", (AH, AH), "action_decoder"), T("act2_b", (AH,), "action_decoder"),
        T("act3_w", (AH, A), "action_decoder"),
    ]
    return layout


def glorot_(linear: nn.Linear) -> None:
    """Glorot-uniform weights and zero bias, as the authors' framework initialises Dense layers."""
    nn.init.xavier_uniform_(linear.weight)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class _BufferPool:
    """Reuses the large CPU buffers of generated weights and their gradients across steps.

    On CPU a fresh multi-megabyte allocation is page-faulted in on first touch,
    which cost more than the matrix products that fill it (measured: see
    pyro_rnp/bench.py). CUDA's caching allocator already reuses memory.
    """

    def __init__(self):
        self.free: dict[tuple, list[torch.Tensor]] = {}

    def take(self, shape, like: torch.Tensor) -> torch.Tensor:
        if like.device.type != "cpu":
            return like.new_empty(shape)
        stack = self.free.get((tuple(shape), like.dtype))
        return stack.pop() if stack else like.new_empty(shape)

    def give(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "cpu":
            self.free.setdefault((tuple(tensor.shape), tensor.dtype), []).append(tensor)


_POOL = _BufferPool()
_FAST_BACKWARD = [False]


class fast_backward:
    """A training step's fast path for generated weights (CPU speed, measured in pyro_rnp.bench).

    Inside this context, generated weights made in the forward pass recycle their
    memory after their backward, and their heads' gradients are added in place
    into ``.grad`` instead of going through autograd's accumulation. Use it only
    around one forward and exactly one backward whose gradients go to an
    optimizer: a second backward through the same graph would read recycled
    memory, and gradient hooks on the heads (DDP's among them) do not fire.
    """

    def __enter__(self):
        self._before = _FAST_BACKWARD[0]
        _FAST_BACKWARD[0] = True

    def __exit__(self, *exc):
        _FAST_BACKWARD[0] = self._before


class GeneratedWeight:
    """Per-sample weights W = (h @ head.T).view(N, i, o) that a program applies at every step.

    Autograd would form a full (N, i, o) gradient at each of the ``steps``
    applications and add them up. Instead each application's backward keeps its
    input and output gradient, and the generating node forms dW once, as one
    batched product over steps, before passing it to the head and to h.
    """

    def __init__(self, h: torch.Tensor, head: torch.Tensor, shape: tuple[int, int]):
        self.shape = shape
        self.value: torch.Tensor | None = None
        self.head = head
        self.fast = _FAST_BACKWARD[0]
        self.inputs: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        # a zero-size tensor that links every application to the generating node in the graph
        self._handle = _Generate.apply(h, head, self)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, i) -> x @ W (N, o)."""
        return _Apply.apply(x, self._handle, self)


class _Generate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, head, holder):
        if holder.fast:
            value = torch.mm(h, head, out=_POOL.take((h.shape[0], head.shape[1]), h))
        else:
            value = torch.mm(h, head)
        holder.value = value.view(h.shape[0], *holder.shape)
        ctx.holder = holder
        ctx.save_for_backward(h, head)
        return h.new_empty(0)

    @staticmethod
    def backward(ctx, _):
        holder = ctx.holder
        h, head = ctx.saved_tensors
        if not holder.inputs:
            return None, None, None
        xs = torch.stack(holder.inputs, dim=1)           # (N, T, i)
        gs = torch.stack(holder.grads, dim=1)            # (N, T, o)
        holder.inputs, holder.grads = [], []
        # (N, i*o): the sum over steps, formed once (a transposed view is the fast bmm layout)
        n, (i, o) = h.shape[0], holder.shape
        grad_w = _POOL.take((n, i, o), h)
        torch.bmm(xs.transpose(1, 2), gs, out=grad_w)
        grad_w = grad_w.view(n, i * o)
        grad_h = torch.mm(grad_w, head.t()) if ctx.needs_input_grad[0] else None
        grad_head = None
        if ctx.needs_input_grad[1]:
            param = holder.head
            if holder.fast and param.grad is not None:
                param.grad.addmm_(h.t(), grad_w)  # in place: a fresh buffer would be page-faulted in
            elif holder.fast:
                param.grad = torch.mm(h.t(), grad_w)
            else:
                grad_head = torch.mm(h.t(), grad_w)
        _POOL.give(grad_w.view(n, i, o))
        if holder.fast:
            _POOL.give(holder.value.view(n, i * o))
            holder.value = None
        return grad_h, grad_head, None


class _Apply(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, handle, holder):
        ctx.holder = holder
        ctx.save_for_backward(x)
        return torch.bmm(x.unsqueeze(1), holder.value).squeeze(1)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        holder = ctx.holder
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.bmm(grad.unsqueeze(1), holder.value.transpose(1, 2)).squeeze(1)
        if ctx.needs_input_grad[1]:
            holder.inputs.append(x)
            holder.grads.append(grad)
        return grad_x, grad.new_empty(0), None


class HyperNetwork(nn.Module):
    """H: LayerNorm-ELU MLP trunk with one head per generated tensor, plus the a0 and x0 heads."""

    def __init__(self, z_dim: int, hidden: int = 64, embed: int = 32, action_hidden: int = 32, pixels: int = 784):
        super().__init__()
        L = hidden
        trunk = [nn.LayerNorm(z_dim), nn.Linear(z_dim, L)]
        for _ in range(4):
            trunk += [nn.LayerNorm(L), nn.ELU(), nn.Linear(L, L)]
        trunk += [nn.LayerNorm(L), nn.ELU()]
        self.trunk = nn.Sequential(*trunk)
        self.layout = generated_layout(z_dim, hidden, embed, action_hidden, pixels)
        # heads stored as (hidden, numel) so that both the forward and the head's gradient are
        # plain row-major products (the transposed gradient product was 5x slower on CPU)
        self.heads = nn.ParameterDict({t.name: nn.Parameter(torch.empty(L, t.numel)) for t in self.layout})
        self.initial_action = nn.Sequential(nn.Linear(L, L), nn.LayerNorm(L), nn.ELU(),
                                            nn.Linear(L, ACTION_DIM, bias=False))
        self.initial_patch = nn.Sequential(nn.Linear(L, L), nn.LayerNorm(L), nn.ELU(),
                                           nn.Linear(L, pixels, bias=False))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        group_size: dict[str, int] = {}
        for t in self.layout:
            group_size[t.group] = group_size.get(t.group, 0) + t.numel
        for m in self.modules():
            if isinstance(m, nn.Linear):
                glorot_(m)
        for t in self.layout:
            # Glorot with the fan-out of the authors' whole group head: keeps the generated gain small
            bound = math.sqrt(6.0 / (self.heads[t.name].shape[0] + group_size[t.group]))
            nn.init.uniform_(self.heads[t.name], -bound, bound)

    @property
    def numel_per_program(self) -> int:
        return sum(t.numel for t in self.layout)

    def forward(self, z: torch.Tensor):
        """(N, z_dim) -> ({name: GeneratedWeight or (N, *shape) tensor}, a0 (N, 6) in [-1, 1], x0 (N, pixels) >= 0).

        Matrices come as GeneratedWeight (call it on a batch of inputs); vectors as tensors.
        """
        h = self.trunk(z)
        n = z.shape[0]
        weights = {t.name: GeneratedWeight(h, self.heads[t.name], t.shape) if len(t.shape) == 2
                   else torch.mm(h, self.heads[t.name]) for t in self.layout}
        a0 = torch.sin(self.initial_action(h))
        x0 = torch.relu(self.initial_patch(h))
        return weights, a0, x0
