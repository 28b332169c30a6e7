"""Generated programs on the fast path: ``PlainPrograms``' numbers with fewer, larger operations."""
from __future__ import annotations

import contextlib

import torch

from ..model.hypernet import GeneratedLayer
from . import layout as layouts
from . import onednn
from .layout import POOL
from .training_pass import TrainingPass


class FastPrograms:
    """The weights of N generated programs, value = h @ head (N, numel): the interface and the
    numbers of ``PlainPrograms``, computed faster.

    ``apply(name, x)`` runs generated layer ``name`` on x (N, inputs), ``chain`` a
    generated MLP as one graph node. The value is never sliced into autograd views
    (each such view's backward would zero-fill a full-size gradient): the layers are
    plain views applied through autograd Functions of our own. Each application's
    backward keeps its input and output gradient; the generating node then forms every
    layer's weight gradient once, over all the steps that used it, in an (N, numel)
    buffer, and passes it to h with one matrix product and to the head with another.
    Inside a ``TrainingPass`` (``training_pass``, when given and gradients are on, and
    autocast is off or on CPU) the buffers are recycled and the head's product is
    deferred to the end of the backward pass, shared with the pass's other batches.

    Under autocast the head's products and the layers' weight gradients run in
    autocast's dtype (``product_dtype``). On CUDA the generated layers do too. On CPU
    they run in float32 on weights rounded to that dtype (``value`` is float32): a
    bfloat16 batched product with one row per matrix, which every generated layer
    is, measured slower than float32 on CPU (see bench.py).
    """

    def __init__(self, h: torch.Tensor, head: torch.Tensor, layout: list[GeneratedLayer],
                 training_pass: TrainingPass | None = None):
        self.n = h.shape[0]
        self.head = head
        fast = training_pass
        autocast = torch.is_autocast_enabled(h.device.type)
        self.product_dtype = torch.get_autocast_dtype(h.device.type) if autocast else h.dtype
        self.float_layers = autocast and h.device.type == "cpu"  # CPU autocast: layers in float32 (above)
        self.fast = fast is not None and torch.is_grad_enabled() and (not autocast or self.float_layers)
        self.row = 0
        self.deferred: torch.Tensor | None = None  # h, once the head's gradient waits for the fast path's flush
        # without gradients (evaluation, figures) the value is only needed until release()
        self.inference = not torch.is_grad_enabled()
        self.layers, self.groups, self.pieces, self.segments = layouts.plan(
            tuple(layout), layouts.GROUP_COLUMNS, layouts.SEGMENT_COLUMNS)
        # the generated numbers, h @ head, as (first column, tensor (N, columns)) runs; one run but on
        # the fast CPU path
        self.value: list[tuple[int, torch.Tensor]] = []
        self.pooled = False  # whether value's one run came from (and goes back to) POOL
        self.views: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.saved = {name: ([], []) for name in self.layers}
        # the fast path that forms this batch's head gradient together with the others', if any
        self.collector = fast if self.fast and fast.register(self, h.device) else None
        # a zero-size tensor that links every application to the generating node in the graph
        self._handle = _Generate.apply(h, head, self)

    def _make_views(self) -> None:
        """Each layer as (weight (N, inputs, outputs), bias (N, 1, outputs) or None): views of the value."""
        for name, (layer, offset) in self.layers.items():
            start, run = next((start, run) for start, run in reversed(self.value) if start <= offset)
            block = run[:, offset - start:offset - start + layer.numel].view(self.n, layer.rows, layer.outputs)
            bias = block[:, layer.inputs:] if layer.bias else None
            self.views[name] = (block[:, :layer.inputs], bias)

    def product_head(self, head: torch.Tensor) -> torch.Tensor:
        """The head in ``product_dtype`` (made once per training pass when there is one)."""
        if self.collector is not None:
            return self.collector.head_in(head, self.product_dtype)
        return head.to(self.product_dtype)

    def apply(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return _Apply.apply(x, self._handle, self, name)

    def chain(self, names: tuple[str, ...], x: torch.Tensor, elu: bool, elu_first: bool,
              out: str | None = None) -> torch.Tensor:
        """Generated layers ``names`` in a row, with ELU between them (and before the first if
        ``elu_first``; none when ``elu`` is False) and ``out`` ("relu", "sin" or None) at the end.

        One graph node for a whole generated MLP: a training step runs about a hundred of
        them, and a node per layer and activation costs Python and autograd time.
        """
        return _ApplyChain.apply(x, self._handle, self, names, elu, elu_first, out)

    def release(self) -> None:
        """The programs have run: call this once no more layers will be applied.

        It drops the link tensor, whose graph node holds these programs: kept, that
        cycle runs through autograd's C++ node, which Python's collector cannot see,
        so every step's programs and graph nodes would stay in memory. Without
        gradients, the weights' memory also goes back to the buffer pool.
        """
        self._handle = None
        if self.inference:
            self._drop_value()

    def _drop_value(self) -> None:
        if self.pooled:
            POOL.give(self.value[0][1])
        self.value, self.views, self.pooled = [], {}, False


class _Generate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, head, programs):
        shape = (h.shape[0], head.shape[1])
        head_t = programs.collector.transposed_head(head) if programs.collector is not None else None
        if programs.float_layers:  # CPU autocast: the product in its dtype, the weights kept in float32
            low_h, low_head = h.to(programs.product_dtype), programs.product_head(head)
            out = POOL.take(shape, h, torch.float32)
            for start, stop in programs.segments:  # in parts, each turned into float32 while in cache
                out[:, start:stop].copy_(torch.mm(low_h, low_head[:, start:stop]))
            programs.value, programs.pooled = [(0, out)], True
        elif torch.is_autocast_enabled(h.device.type):  # mixed precision: autocast picks the dtype
            programs.value = [(0, torch.mm(h, head))]
        elif head_t is not None:  # oneDNN writes fresh tensors: one per segment (see segments)
            programs.value = [(start, onednn.mm_nt(h, head_t[start:stop])) for start, stop in programs.segments]
        else:
            programs.pooled = programs.fast or programs.inference
            out = POOL.take(shape, h) if programs.pooled else h.new_empty(shape)
            programs.value = [(0, torch.mm(h, head, out=out))]
        programs._make_views()
        ctx.programs = programs
        ctx.save_for_backward(h, head)
        return h.new_empty(0)

    @staticmethod
    def backward(ctx, _):
        programs = ctx.programs
        h, head = ctx.saved_tensors
        n, dtype = h.shape[0], programs.product_dtype
        defer = programs.collector is not None and ctx.needs_input_grad[1]
        if defer:  # one buffer per column group, shared with the pass's other batches
            groups, grads = programs.groups, programs.collector.gradient_rows(programs, h, dtype)
        else:
            groups = [(0, head.shape[1])]
            grads = [POOL.take((n, head.shape[1]), h, dtype) if programs.fast
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
            product_head = programs.product_head(head) if head_t is None else None
            grad_h = sum((onednn.mm_nt(grad, product_head[:, start:stop]) if head_t is None
                          else onednn.mm(grad, head_t[start:stop])).to(h.dtype)  # summed in h's precision
                         for (start, stop), grad in zip(groups, grads))
        grad_head = None
        if defer:
            programs.deferred = h
        elif ctx.needs_input_grad[1]:
            param = programs.head
            if programs.fast and param.grad is not None:  # in place: a fresh buffer would be page-faulted in
                onednn.add_mm_tn(param.grad, h.to(dtype), grads[0])
            elif programs.fast:
                param.grad = torch.mm(h.t().to(dtype), grads[0]).to(param.dtype)
            else:
                grad_head = torch.mm(h.t().to(dtype), grads[0])
        if programs.fast:
            if not defer:
                POOL.give(grads[0])
            programs._drop_value()
        return grad_h, grad_head, None


def _linear(programs: FastPrograms, name: str, x: torch.Tensor) -> torch.Tensor:
    """Generated layer ``name`` on x (N, inputs): one batched product per layer for all programs
    (call it with autocast off where ``programs.float_layers``; see _layers)."""
    w, b = programs.views[name]
    x3 = x.unsqueeze(1)
    return (torch.bmm(x3, w) if b is None else torch.baddbmm(b, x3, w)).squeeze(1)


def _grad_input(programs: FastPrograms, name: str, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of generated layer ``name``'s input, from its output's."""
    w, _ = programs.views[name]
    return torch.bmm(grad.unsqueeze(1), w.transpose(1, 2)).squeeze(1)


def _layers(programs: FastPrograms):
    """The context generated layers run in: autocast off where they run in float32 (see FastPrograms)."""
    return torch.autocast("cpu", enabled=False) if programs.float_layers else contextlib.nullcontext()


def _layer_input(programs: FastPrograms, x: torch.Tensor) -> torch.Tensor:
    return x.float() if programs.float_layers else x


class _Apply(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, handle, programs, name):
        ctx.programs, ctx.name = programs, name
        x = _layer_input(programs, x)
        ctx.save_for_backward(x)
        with _layers(programs):
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
    """Several generated layers and their activations as one graph node (FastPrograms.chain)."""

    @staticmethod
    def forward(ctx, x, handle, programs, names, elu, elu_first, out):
        inputs = []   # what each layer read
        h = _layer_input(programs, x)
        with _layers(programs):
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
