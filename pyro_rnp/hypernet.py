"""The one shared hypernetwork H: program vector z -> weights of a small recurrent machine.

H's trunk maps z to a 64-d code h; one bias-free head maps h to every number of
the generated program at once (the authors' five weight heads side by side,
~1.33e5 numbers at paper sizes). The generated layers are read out of that
product as plain views and applied through two small autograd Functions, so the
big output is never sliced into autograd views (whose backward zero-fills a
full-size gradient per slice, a third of a straightforward port's step), and the
gradient of each generated layer is formed once for all steps that used it.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import cpu

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


GROUP_COLUMNS = 8192


def column_groups(layout: list[GeneratedLayer], limit: int | None = None) -> list[tuple[int, int]]:
    """The head's columns cut into runs of at most ``limit`` at layer or row boundaries (a row of a
    generated layer has ``outputs`` columns and is never cut).

    The fast CPU path keeps each run's gradient rows in a buffer of its own, so the
    head's gradient comes out in results of 64 x limit numbers (2 MB) that glibc
    serves warm from its heap; one 34 MB result is mapped afresh and page-faulted in
    on every step (8k faults, 8-40 ms per step here), and 16 MB ones made the heap
    grow every step.
    """
    limit = limit or GROUP_COLUMNS
    groups, start, end = [], 0, 0
    for layer in layout:
        rows_left = layer.rows
        while rows_left:
            room = (start + limit - end) // layer.outputs
            if room == 0 and end > start:
                groups.append((start, end))
                start = end
                continue
            take = min(rows_left, max(room, 1))
            end += take * layer.outputs
            rows_left -= take
    groups.append((start, end))
    return groups


def _pieces(layers: dict, groups: list[tuple[int, int]]) -> dict[str, list[tuple[int, int, int, int]]]:
    """For each layer, its parts in the column groups: (group, first column in the group, first row,
    end row) of the layer's (rows, outputs) matrix."""
    pieces = {}
    for name, (layer, offset) in layers.items():
        pieces[name] = []
        for g, (start, stop) in enumerate(groups):
            lo, hi = max(start, offset), min(stop, offset + layer.numel)
            if lo < hi:
                pieces[name].append((g, lo - start, (lo - offset) // layer.outputs, (hi - offset) // layer.outputs))
    return pieces


SEGMENT_COLUMNS = 65536


def segments(layout: list[GeneratedLayer], limit: int | None = None) -> list[tuple[int, int]]:
    """The head's columns cut at layer boundaries into runs of at most ``limit`` (or one layer).

    The fast CPU path writes each run's generated weights as a tensor of its own,
    straight from oneDNN: at batch 64, runs of at most 16 MB that glibc serves from
    its heap (see cpu.keep_freed_memory), where one 34 MB tensor would be mapped
    afresh and page-faulted in on every step; 1.3 ms faster per batch than 2 MB
    blocks copied into one recycled buffer (measured).
    """
    limit = limit or SEGMENT_COLUMNS
    runs, start, end = [], 0, 0
    for layer in layout:
        if end > start and end + layer.numel - start > limit:
            runs.append((start, end))
            start = end
        end += layer.numel
    runs.append((start, end))
    return runs


@functools.lru_cache(maxsize=32)
def _plan(layout: tuple[GeneratedLayer, ...], limit: int, segment_limit: int):
    """Each layer's (layer, column offset), the column groups, each layer's pieces in them, and the
    segments: worked out once per layout (every batch of programs of a step shares it)."""
    layers, offset = {}, 0
    for layer in layout:
        layers[layer.name] = (layer, offset)
        offset += layer.numel
    groups = column_groups(list(layout), limit)
    return layers, groups, _pieces(layers, groups), segments(list(layout), segment_limit)


class _BufferPool:
    """Reuses the large CPU buffers of generated programs and their gradients across steps.

    On CPU a fresh multi-megabyte allocation is page-faulted in on first touch,
    which cost more than the matrix products that fill it (measured with
    ``python -m pyro_rnp.bench --profile``). CUDA's caching allocator already reuses memory.
    """

    def __init__(self):
        self.free: dict[tuple, list[torch.Tensor]] = {}

    def take(self, shape, like: torch.Tensor) -> torch.Tensor:
        if like.device.type != "cpu":
            return like.new_empty(shape)
        stack = self.free.get((tuple(shape), like.dtype))
        return stack.pop() if stack else like.new_empty(shape)

    def give(self, tensor: torch.Tensor) -> None:
        # a tensor made under torch.inference_mode cannot be written later by a step that records gradients
        if tensor.device.type == "cpu" and not tensor.is_inference():
            self.free.setdefault((tuple(tensor.shape), tensor.dtype), []).append(tensor)


_POOL = _BufferPool()
_FAST_BACKWARD: list["fast_backward | None"] = [None]


class fast_backward:
    """A training step's fast path for generated programs (CPU speed, see pyro_rnp.bench).

    Inside this context the generated weights made in the forward pass recycle
    their memory after their backward, and the head's gradient goes straight into
    ``.grad``, past autograd's accumulation. On CPU, every program batch of the
    pass writes its weight gradient into rows of one shared buffer, and the head's
    gradient is one product over all of them (inner size 320 at paper sizes instead
    of five products of 64), run when autograd finishes the backward pass; the
    forward products read a transposed copy of the head made once per pass (see
    cpu.py). Use it only around forward passes each followed by exactly one
    backward whose gradients go to an optimizer, and do not change the head
    inside it: a second backward through the same graph would read recycled
    memory, and gradient hooks on the head (DDP's among them) do not fire.
    """

    def __init__(self):
        self.batches: list[GeneratedPrograms] = []  # CPU batches of this forward pass, in order
        self.rows = 0
        self.slabs: list[torch.Tensor] | None = None  # per column group, (rows, columns): every batch's gradient
        self.head_t: torch.Tensor | None = None

    def __enter__(self):
        self._before = _FAST_BACKWARD[0]
        _FAST_BACKWARD[0] = self
        return self

    def __exit__(self, *exc):
        _FAST_BACKWARD[0] = self._before
        self._reset()

    def _register(self, programs: "GeneratedPrograms", device: torch.device) -> bool:
        """Whether this batch's head gradient joins the pass's one product (CPU batches of one head)."""
        if device.type != "cpu" or (self.batches and self.batches[0].head is not programs.head):
            return False
        programs.row = self.rows
        self.rows += programs.n
        self.batches.append(programs)
        return True

    def transposed_head(self, head: torch.Tensor) -> torch.Tensor | None:
        """head.T, copied once per forward pass, when oneDNN runs this pass's forward products."""
        if not cpu.uses_onednn(head):
            return None
        if self.head_t is None:
            self.head_t = cpu.transpose_into(head, _POOL.take(head.shape[::-1], head))
        return self.head_t

    def _gradient_rows(self, programs: "GeneratedPrograms", like: torch.Tensor) -> list[torch.Tensor]:
        """This batch's rows of each column group's buffer; the first call of a backward pass queues
        the final product."""
        if self.slabs is None:
            self.slabs = [_POOL.take((self.rows, stop - start), like) for start, stop in programs.groups]
            torch.autograd.Variable._execution_engine.queue_callback(self._flush)
        return [slab[programs.row:programs.row + programs.n] for slab in self.slabs]

    def _flush(self) -> None:
        """head.grad += H^T G over every batch whose backward ran (called when autograd finishes)."""
        done = [b for b in self.batches if b.deferred is not None]
        if done:
            head = done[0].head
            if head.grad is None:
                head.grad = torch.zeros_like(head)
            every_h = torch.cat([b.deferred for b in done]) if len(done) == len(self.batches) else None
            for (start, stop), slab in zip(done[0].groups, self.slabs):
                target = head.grad[:, start:stop]
                if every_h is not None:
                    cpu.add_mm_tn(target, every_h, slab)
                else:  # part of the forward pass was not differentiated: its rows hold stale numbers
                    for b in done:
                        cpu.add_mm_tn(target, b.deferred, slab[b.row:b.row + b.n])
        self._reset()

    def _reset(self) -> None:
        for buffer in (self.slabs or []) + [self.head_t]:
            if buffer is not None:
                _POOL.give(buffer)
        self.batches, self.rows, self.slabs, self.head_t = [], 0, None, None


class GeneratedPrograms:
    """The weights of N generated programs: value = h @ head, (N, numel per program).

    ``apply(name, x)`` runs generated layer ``name`` on x (N, inputs), ``chain``
    a generated MLP. Each application's backward keeps its input and output
    gradient; the generating node then forms every layer's weight gradient once,
    over all the steps that used it, in an (N, numel) buffer (on the fast CPU
    path: rows of per-column-group buffers shared by the step's batches), and
    passes it to h with one matrix product and to the head with another (on the
    fast CPU path: one for all of the step's batches, see ``fast_backward``).
    """

    def __init__(self, h: torch.Tensor, head: torch.Tensor, layout: list[GeneratedLayer]):
        self.n = h.shape[0]
        self.head = head
        fast = _FAST_BACKWARD[0]
        self.fast = fast is not None and torch.is_grad_enabled() and not torch.is_autocast_enabled(h.device.type)
        self.row = 0
        self.deferred: torch.Tensor | None = None  # h, once the head's gradient waits for the fast path's flush
        # without gradients (evaluation, figures) the value is only needed until release()
        self.inference = not torch.is_grad_enabled()
        self.layers, self.groups, self.pieces, self.segments = _plan(tuple(layout), GROUP_COLUMNS, SEGMENT_COLUMNS)
        # the generated numbers, h @ head, as (first column, tensor (N, columns)) runs; one run but on
        # the fast CPU path
        self.value: list[tuple[int, torch.Tensor]] = []
        self.pooled = False  # whether value's one run came from (and goes back to) _POOL
        self.dtype = h.dtype
        self.views: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.saved = {name: ([], []) for name in self.layers}
        # the fast path that forms this batch's head gradient together with the others', if any
        self.collector = fast if self.fast and fast._register(self, h.device) else None
        # a zero-size tensor that links every application to the generating node in the graph
        self._handle = _Generate.apply(h, head, self)

    def _make_views(self) -> None:
        """Each layer as (weight (N, inputs, outputs), bias (N, 1, outputs) or None): views of the value."""
        for name, (layer, offset) in self.layers.items():
            start, run = next((start, run) for start, run in reversed(self.value) if start <= offset)
            block = run[:, offset - start:offset - start + layer.numel].view(self.n, layer.rows, layer.outputs)
            bias = block[:, layer.inputs:] if layer.bias else None
            self.views[name] = (block[:, :layer.inputs], bias)

    def apply(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return _Apply.apply(x, self._handle, self, name)

    def chain(self, names: tuple[str, ...], x: torch.Tensor, elu: bool, elu_first: bool,
              out: str | None = None) -> torch.Tensor:
        """Generated layers ``names`` in a row, with ELU between them (and before the first if
        ``elu_first``; none when ``elu`` is False) and ``out`` ("relu", "sin" or None) at the end.

        One graph node for a whole generated MLP: a training step runs about a hundred of
        them, and each node and activation of its own cost Python and autograd time.
        """
        return _ApplyChain.apply(x, self._handle, self, names, elu, elu_first, out)

    def release(self) -> None:
        """The programs have run: call this once no more layers will be applied.

        It drops the link tensor, whose graph node holds these programs: kept, that
        cycle runs through autograd's C++ node, which Python's collector cannot see,
        so every step's programs and graph nodes would stay in memory (measured:
        about 300 objects and 3 MB per training step). Without gradients, the
        weights' memory also goes back to the pool (on this project's CPU machine,
        re-faulting it in cost more than running the programs).
        """
        self._handle = None
        if self.inference:
            self._drop_value()

    def _drop_value(self) -> None:
        if self.pooled:
            _POOL.give(self.value[0][1])
        self.value, self.views, self.pooled = [], {}, False


class _Generate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, head, programs):
        shape = (h.shape[0], head.shape[1])
        head_t = programs.collector.transposed_head(head) if programs.collector is not None else None
        if torch.is_autocast_enabled(h.device.type):  # mixed precision: autocast picks the dtype
            programs.value = [(0, torch.mm(h, head))]
        elif head_t is not None:  # oneDNN writes fresh tensors: one per segment (see segments)
            programs.value = [(start, cpu.mm_nt(h, head_t[start:stop])) for start, stop in programs.segments]
        else:
            programs.pooled = programs.fast or programs.inference
            out = _POOL.take(shape, h) if programs.pooled else h.new_empty(shape)
            programs.value = [(0, torch.mm(h, head, out=out))]
        programs.dtype = programs.value[0][1].dtype
        programs._make_views()
        ctx.programs = programs
        ctx.save_for_backward(h, head)
        return h.new_empty(0)

    @staticmethod
    def backward(ctx, _):
        programs = ctx.programs
        h, head = ctx.saved_tensors
        n, dtype = h.shape[0], programs.dtype  # under autocast the products run in the forward's dtype
        defer = programs.collector is not None and ctx.needs_input_grad[1]
        if defer:  # one buffer per column group, shared with the pass's other batches
            groups, grads = programs.groups, programs.collector._gradient_rows(programs, h)
        else:
            groups = [(0, head.shape[1])]
            grads = [_POOL.take((n, head.shape[1]), h) if programs.fast
                     else h.new_empty((n, head.shape[1]), dtype=dtype)]
        for name, (layer, offset) in programs.layers.items():
            xs, gs = programs.saved[name]
            g = torch.stack(gs, dim=1).to(dtype) if gs else None               # (N, T, o)
            x = torch.stack(xs, dim=1).to(dtype).transpose(1, 2) if gs and layer.inputs else None  # (N, i, T)
            for group, column, first, end in (programs.pieces[name] if defer else [(0, offset, 0, layer.rows)]):
                block = grads[group][:, column:column + (end - first) * layer.outputs]
                block = block.view(n, end - first, layer.outputs)
                if g is None:
                    block.zero_()
                    continue
                weights = min(end, layer.inputs) - first
                if weights > 0:
                    # the sum over steps of x_t^T g_t, formed once (a transposed view is the fast bmm layout)
                    torch.bmm(x[:, first:first + weights], g, out=block[:, :weights])
                if end > layer.inputs:  # the bias row
                    torch.sum(g, dim=1, out=block[:, layer.inputs - first])
        programs.saved = {name: ([], []) for name in programs.layers}
        programs._handle = None  # no layer runs after the backward pass (see release)
        grad_h = None
        if ctx.needs_input_grad[0]:
            head_t = programs.collector.head_t if programs.collector is not None else None
            grad_h = sum(cpu.mm_nt(grad, head[:, start:stop].to(dtype)) if head_t is None
                         else cpu.mm(grad, head_t[start:stop]) for (start, stop), grad in zip(groups, grads))
        grad_head = None
        if defer:
            programs.deferred = h
        elif ctx.needs_input_grad[1]:
            param = programs.head
            if programs.fast and param.grad is not None:
                param.grad.addmm_(h.t(), grads[0])  # in place: a fresh buffer would be page-faulted in
            elif programs.fast:
                param.grad = torch.mm(h.t(), grads[0])
            else:
                grad_head = torch.mm(h.t().to(dtype), grads[0])
        if programs.fast:
            if not defer:
                _POOL.give(grads[0])
            programs._drop_value()
        return grad_h, grad_head, None


def _linear(programs: GeneratedPrograms, name: str, x: torch.Tensor) -> torch.Tensor:
    """Generated layer ``name`` on x (N, inputs): one batched product per layer for all programs."""
    w, b = programs.views[name]
    x3 = x.unsqueeze(1)
    return (torch.bmm(x3, w) if b is None else torch.baddbmm(b, x3, w)).squeeze(1)


def _grad_input(programs: GeneratedPrograms, name: str, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of generated layer ``name``'s input, from its output's."""
    w, _ = programs.views[name]
    return torch.bmm(grad.unsqueeze(1), w.transpose(1, 2)).squeeze(1)


class _Apply(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, handle, programs, name):
        ctx.programs, ctx.name = programs, name
        ctx.save_for_backward(x)
        return _linear(programs, name, x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        programs, name = ctx.programs, ctx.name
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _grad_input(programs, name, grad)
        if ctx.needs_input_grad[1]:
            xs, gs = programs.saved[name]
            xs.append(x)
            gs.append(grad)
        return grad_x, grad.new_empty(0), None, None


class _ApplyChain(torch.autograd.Function):
    """Several generated layers and their activations as one graph node (GeneratedPrograms.chain)."""

    @staticmethod
    def forward(ctx, x, handle, programs, names, elu, elu_first, out):
        inputs = []   # what each layer read
        h = x
        for k, name in enumerate(names):
            if elu and (k > 0 or elu_first):
                h = torch.nn.functional.elu(h)
            inputs.append(h)
            h = _linear(programs, name, h)
        y = h if out is None else torch.relu(h) if out == "relu" else torch.sin(h)
        ctx.programs, ctx.names, ctx.elu, ctx.elu_first, ctx.out = programs, names, elu, elu_first, out
        ctx.save_for_backward(h if out == "sin" else y, *inputs)
        return y

    @staticmethod
    def backward(ctx, grad):
        last, *inputs = ctx.saved_tensors
        programs, names = ctx.programs, ctx.names
        if ctx.out == "relu":
            grad = grad * (last > 0)
        elif ctx.out == "sin":
            grad = grad * torch.cos(last)
        for k in reversed(range(len(names))):
            if ctx.needs_input_grad[1]:
                xs, gs = programs.saved[names[k]]
                xs.append(inputs[k])
                gs.append(grad)
            activated = ctx.elu and (k > 0 or ctx.elu_first)
            if k == 0 and not ctx.needs_input_grad[0]:
                return None, grad.new_empty(0), None, None, None, None, None
            grad = _grad_input(programs, names[k], grad)
            if activated:  # ELU's derivative from its output: 1 above zero, output + 1 below
                grad = torch.ops.aten.elu_backward(grad, 1.0, 1, 1, True, inputs[k])
        return grad, grad.new_empty(0), None, None, None, None, None


class HyperNetwork(nn.Module):
    """H: LayerNorm-ELU MLP trunk, one head for all generated layers, plus the a0 and x0 heads."""

    def __init__(self, z_dim: int, hidden: int = 64, embed: int = 32, action_hidden: int = 32, pixels: int = 784):
        super().__init__()
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

    def forward(self, z: torch.Tensor):
        """(N, z_dim) -> (GeneratedPrograms, a0 (N, 6) in [-1, 1], x0 (N, pixels) >= 0)."""
        h = self.trunk(z)
        programs = GeneratedPrograms(h, self.head, self.layout)
        a0 = torch.sin(self.initial_action(h))
        x0 = torch.relu(self.initial_patch(h))
        return programs, a0, x0
