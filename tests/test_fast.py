"""The speed layer gives the model layer's numbers: the fast program path against the plain one
(values and every parameter's gradient, at depth 1, 2 and 3, forward-only and in training), the
head's CPU products (oneDNN where it runs, torch.mm otherwise) against float64, and the layout and
process settings the fast path relies on."""
import os
import platform
import subprocess
import sys

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

from conftest import tiny_config
from pyro_rnp import RNP
from pyro_rnp.fast import FastProgramPath, FastPrograms, accelerate, onednn, plain, program_path
from pyro_rnp.fast import layout as fast_layout
from pyro_rnp.fast.layout import column_groups, segments
from pyro_rnp.model.hypernet import GeneratedLayer, HyperNetwork, PlainPrograms
from pyro_rnp.training import TrainStep, make_optimizer

cpu = onednn  # the head's CPU products


@pytest.fixture(params=["onednn", "torch.mm"])
def backend(request, monkeypatch):
    if request.param == "onednn" and not onednn.onednn_available():
        pytest.skip("oneDNN's matmul is not available in this PyTorch build")
    monkeypatch.setitem(onednn._state, "onednn", request.param == "onednn")
    return request.param


def _elbo_gradients(rnp, x, path: str, seed: int = 1) -> tuple[torch.Tensor, dict]:
    """Loss and every parameter's gradient of one Trace_ELBO pass on the plain path, the fast path, or the
    fast path inside a training pass (deferred head gradient), with the same sampled z."""
    (accelerate if path != "plain" else plain)(rnp)
    rnp.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    training_pass = program_path(rnp).training_pass() if path == "training" else torch.enable_grad()
    with training_pass:
        loss = Trace_ELBO().differentiable_loss(rnp.model, rnp.guide, x)
        loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in rnp.named_parameters()}


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_fast_path_gives_the_plain_paths_canvas_and_tree(depth):
    """Forward only: every recorded tensor of the parse at every level agrees."""
    torch.manual_seed(0)
    rnp = RNP(tiny_config(depth=depth, steps=2))
    z = torch.randn(5, rnp.config.z_dim)
    with torch.no_grad():
        reference = plain(rnp).decode(z).tree
        fast = accelerate(rnp).decode(z).tree
    assert isinstance(rnp.executor.hypernet.make_programs, FastProgramPath)
    for plain_nodes, fast_nodes in zip(reference.levels(), fast.levels(), strict=True):
        for a, b in zip(plain_nodes, fast_nodes, strict=True):
            for field in ("canvas", "theta", "patches", "placed", "child_z"):
                assert torch.allclose(getattr(a, field), getattr(b, field), atol=1e-5), (depth, a.level, field)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_fast_path_gives_the_plain_paths_loss_and_every_gradient(depth, fashion_images):
    """In training: the loss and every parameter's gradient agree, with and without a training pass."""
    torch.manual_seed(0)
    rnp = RNP(tiny_config(depth=depth, steps=2))
    x = fashion_images[:6]
    loss, reference = _elbo_gradients(rnp, x, "plain")
    scale = max(g.abs().max() for g in reference.values())
    for path in ("fast", "training"):
        fast_loss, grads = _elbo_gradients(rnp, x, path)
        assert torch.allclose(fast_loss, loss, rtol=1e-5), path
        for name, g in reference.items():
            # float32 sums in another order; some gradients are rounding noise (a bias before batch norm),
            # so the tolerance is relative to the largest gradient
            assert torch.allclose(grads[name], g, rtol=1e-3, atol=1e-5 * scale), (path, name)


def test_the_training_step_chooses_its_path_explicitly(fashion_images):
    """TrainStep(fast=True) puts the fast path on the model; fast=False leaves the plain one; a model
    built from its config runs the plain one until then."""
    rnp = RNP(tiny_config())
    assert rnp.executor.hypernet.make_programs is PlainPrograms and program_path(rnp) is None
    TrainStep(rnp, make_optimizer(rnp, 1e-3), fast=False)(fashion_images[:4])
    assert program_path(rnp) is None
    step = TrainStep(rnp, make_optimizer(rnp, 1e-3))
    assert isinstance(step.program_path, FastProgramPath) and program_path(rnp) is step.program_path
    loss, applied = step(fashion_images[:4])
    assert bool(applied) and torch.isfinite(loss)
    assert step.program_path.current is None  # the training pass is closed after the step


def test_plain_and_fast_training_steps_update_the_weights_alike(fashion_images):
    """A few SGD steps on each path from the same start land on the same weights. (SGD: Adam divides
    each gradient by its own size, which turns the rounding noise of a bias before batch norm into
    steps of the full learning rate.)"""
    def train(fast: bool):
        torch.manual_seed(0)
        pyro.set_rng_seed(0)
        rnp = RNP(tiny_config(depth=2, steps=2))
        step = TrainStep(rnp, torch.optim.SGD(rnp.parameters(), lr=1e-3), fast=fast)
        for k in range(3):
            step(fashion_images[8 * k:8 * k + 8], k)
        return rnp.state_dict()
    reference, fast = train(False), train(True)
    for name, value in reference.items():
        if value.is_floating_point():
            assert torch.allclose(fast[name], value, rtol=1e-3, atol=1e-5), name


def test_head_products_match_float64(backend):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 5, generator=g)
    head = torch.randn(5, 12_007, generator=g)
    grad = torch.randn(6, head.shape[1], generator=g)
    exact = h.double() @ head.double()
    head_t = cpu.transpose_into(head, torch.empty(head.shape[::-1]))
    assert torch.equal(head_t, head.t())
    assert torch.allclose(cpu.mm_nt(h, head_t).double(), exact, atol=1e-4)
    assert torch.allclose(cpu.mm_nt(grad, head).double(), grad.double() @ head.double().t(), atol=1e-3)
    tn = h.double().t() @ grad.double()
    assert torch.allclose(cpu.add_mm_tn(None, h, grad).double(), tn, atol=1e-4)
    target = torch.ones(5, head.shape[1])
    out = cpu.add_mm_tn(target, h, grad)
    assert out is target and torch.allclose(out.double(), tn + 1, atol=1e-4)


def test_onednn_is_refused_for_other_dtypes(backend):
    assert not cpu.uses_onednn(torch.zeros(2, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not cpu.uses_onednn(torch.zeros(2))


@pytest.mark.parametrize("limit", [None, 100])
def test_segments_tile_the_head_at_layer_boundaries(limit):
    layout = HyperNetwork(32).layout
    runs = segments(layout, limit)
    ends, end = set(), 0
    for layer in layout:
        end += layer.numel
        ends.add(end)
    assert runs[0][0] == 0 and runs[-1][1] == end and all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
    assert all(stop in ends for _, stop in runs)
    biggest = max(layer.numel for layer in layout)
    assert all(stop - start <= max(limit or fast_layout.SEGMENT_COLUMNS, biggest) for start, stop in runs)
    if limit == 100:  # every layer of the paper's sizes is bigger: one segment each
        assert len(runs) == len(layout)


def test_column_groups_cut_the_head_at_row_boundaries():
    layout = HyperNetwork(32).layout
    groups = column_groups(layout)
    assert groups[0][0] == 0 and groups[-1][1] == sum(layer.numel for layer in layout)
    assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
    assert max(stop - start for start, stop in groups) <= fast_layout.GROUP_COLUMNS
    # no row of a generated layer is cut
    offsets, offset = {}, 0
    for layer in layout:
        offsets[layer.name] = offset
        offset += layer.numel
    for start, _ in groups[1:]:
        layer = next(layer for layer in layout if offsets[layer.name] <= start < offsets[layer.name] + layer.numel)
        assert (start - offsets[layer.name]) % layer.outputs == 0


@pytest.mark.parametrize("group_columns", [8192, 50])
def test_fast_step_gradients_match_plain_autograd(backend, group_columns, fashion_images, monkeypatch):
    """The fast path (forward in segments, deferred head gradient over all program batches, gradient
    rows kept per column group; 50 columns cuts the tiny model's layers across groups and puts
    every layer in a segment of its own) in float32."""
    monkeypatch.setattr(fast_layout, "GROUP_COLUMNS", group_columns)
    monkeypatch.setattr(fast_layout, "SEGMENT_COLUMNS", group_columns)
    torch.manual_seed(0)
    rnp = RNP(tiny_config(depth=2, steps=3))
    layout = rnp.executor.hypernet.layout
    if group_columns == 50:
        assert len(column_groups(layout)) > len(layout)  # some layers span several groups
    x = fashion_images[:6]
    plain_grads, fast = _elbo_gradients(rnp, x, "plain")[1], _elbo_gradients(rnp, x, "training")[1]
    plain = plain_grads
    # float32 rounding differs between the two orders of summation; some gradients are rounding noise
    # (a bias before batch norm), so the tolerance is relative to the largest gradient
    scale = max(g.abs().max() for g in plain.values())
    for name in plain:
        assert torch.allclose(fast[name], plain[name], rtol=1e-3, atol=1e-5 * scale), name
    head = "executor.hypernet.head"
    assert torch.allclose(fast[head], plain[head], rtol=1e-4, atol=1e-6 * plain[head].abs().max())


def test_deferred_head_gradient_skips_batches_that_were_not_differentiated(backend):
    """A program batch made in the forward pass but not used by the loss leaves no trace in the head's
    gradient (its rows of the shared buffer are never written)."""
    layout = [GeneratedLayer("a", 5, 3, True, "g")]
    numel = layout[0].numel

    def run(fast, unused_first):
        torch.manual_seed(0)
        head = torch.nn.Parameter(torch.randn(4, numel))
        hs = [torch.randn(3, 4, requires_grad=True) for _ in range(2)]
        x = torch.randn(3, 5)
        path = FastProgramPath() if fast else PlainPrograms
        with path.training_pass() if fast else torch.enable_grad():
            batches = [path(h, head, layout) for h in hs]
            used = batches[1] if unused_first else batches[0]
            used.apply("a", x).square().sum().backward()
        return head.grad

    for unused_first in (True, False):
        assert torch.allclose(run(False, unused_first), run(True, unused_first), atol=1e-5)


_MAPPED = """
import ctypes, torch
from pyro_rnp.fast import process
on = process.keep_freed_memory()
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
before = libc.mallinfo2().hblkhd
x = torch.empty(5_000_000)  # 20 MB: glibc's adaptive threshold maps it afresh (and unmaps it when freed)
print(on, libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc"
                    or tuple(map(int, platform.libc_ver()[1].split(".")[:2])) < (2, 33),
                    reason="the allocator setting is for glibc; mallinfo2 needs glibc 2.33")
def test_blocks_under_32_mb_come_from_the_heap_not_fresh_mappings():
    """The setting's mechanism, in fresh processes: a 20 MB block is served from glibc's heap (reused
    warm step after step) instead of being mapped for itself. (Counting page faults over a churn of
    allocations, the effect it has on a training step, proved to depend on the heap's layout.)"""
    def run(setting):
        env = {**os.environ, "PYRO_RNP_MALLOPT": setting}
        out = subprocess.run([sys.executable, "-c", _MAPPED], env=env, capture_output=True, text=True, check=True)
        on, mapped = out.stdout.split()
        return on == "True", int(mapped)
    assert run("1") == (True, 0)
    off, mapped = run("0")
    assert not off and mapped >= 20_000_000


def test_fast_generated_layers_match_plain_autograd():
    """FastPrograms' hand-written backward (one gradient per layer over all steps, in-place head gradient)
    gives PlainPrograms' gradients, and both give those of the plain product written out by hand."""
    n, hidden = 4, 6
    layout = [GeneratedLayer("a", 5, 3, True, "g"), GeneratedLayer("b", 3, 4, False, "g"),
              GeneratedLayer("h0", 0, 4, True, "g"), GeneratedLayer("unused", 2, 2, True, "g")]
    numel = sum(layer.numel for layer in layout)

    def run(mode, training_pass=None):
        torch.manual_seed(1)
        h = torch.randn(n, hidden, dtype=torch.float64, requires_grad=True)
        head = torch.nn.Parameter(torch.randn(hidden, numel, dtype=torch.float64))
        xs = [torch.randn(n, 5, dtype=torch.float64, requires_grad=True) for _ in range(3)]
        if mode == "plain":
            value = h @ head
            wa, wb, h0 = value[:, :18].view(n, 6, 3), value[:, 18:30].view(n, 3, 4), value[:, 30:34]
            layer_a = lambda x: torch.bmm(x.unsqueeze(1), wa[:, :5]).squeeze(1) + wa[:, 5]
            layer_b = lambda x: torch.bmm(x.unsqueeze(1), wb).squeeze(1)
        else:
            programs = (PlainPrograms(h, head, layout) if mode == "plain programs"
                        else FastPrograms(h, head, layout, training_pass))
            layer_a = lambda x: programs.apply("a", x)
            layer_b = lambda x: programs.apply("b", x)
            h0 = programs.apply("h0", h.new_empty(n, 0))
        loss = sum((layer_b(layer_a(x)).sin() * (k + 1) * h0).sum() for k, x in enumerate(xs))
        loss.backward()
        return [h.grad, head.grad] + [x.grad for x in xs]

    by_hand = run("plain")
    path = FastProgramPath()
    with path.training_pass() as training_pass:
        deferred = run("fast", training_pass)
    for other in (run("plain programs"), run("fast"), deferred):
        for a, b in zip(by_hand, other, strict=True):
            assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("elu,elu_first,out", [(True, True, None), (True, False, "relu"), (True, False, "sin"),
                                                (False, False, "relu"), (False, True, "sin")])
def test_generated_chain_matches_its_layers_one_by_one(elu, elu_first, out):
    """chain (on the fast path one graph node for a generated MLP) gives the values and gradients of
    applying its layers and activations one at a time, on both paths."""
    n, hidden = 4, 6
    layout = [GeneratedLayer("a", 5, 3, True, "g"), GeneratedLayer("b", 3, 4, True, "g"),
              GeneratedLayer("c", 4, 2, False, "g")]
    numel = sum(layer.numel for layer in layout)
    finish = {None: lambda y: y, "relu": torch.relu, "sin": torch.sin}[out]
    act = torch.nn.functional.elu if elu else (lambda y: y)

    def run(chained, make):
        torch.manual_seed(2)
        h = torch.randn(n, hidden, dtype=torch.float64, requires_grad=True)
        head = torch.nn.Parameter(torch.randn(hidden, numel, dtype=torch.float64) / 3)
        x = torch.randn(n, 5, dtype=torch.float64, requires_grad=True)
        programs = make(h, head, layout)
        if chained:
            y = programs.chain(("a", "b", "c"), x, elu, elu_first, out)
        else:
            y = x
            for k, name in enumerate("abc"):
                y = programs.apply(name, act(y) if k > 0 or elu_first else y)
            y = finish(y)
        (y * torch.arange(1.0, 3.0, dtype=torch.float64)).sum().backward()
        return [y.detach(), x.grad, h.grad, head.grad]

    reference = run(False, PlainPrograms)
    for chained, make in ((True, PlainPrograms), (False, FastPrograms), (True, FastPrograms)):
        for a, b in zip(reference, run(chained, make), strict=True):
            assert torch.allclose(a, b, atol=1e-12)


def test_training_works_after_decoding_under_inference_mode():
    """Caches and recycled buffers made under torch.inference_mode must not reach a training step."""
    rnp = accelerate(RNP(tiny_config()))
    with torch.inference_mode():
        rnp.decode(torch.randn(3, rnp.config.z_dim))
    step = TrainStep(rnp, make_optimizer(rnp, 1e-3))
    loss, applied = step(torch.rand(3, 1, 28, 28))
    assert bool(applied) and torch.isfinite(loss)


def test_the_commands_take_the_plain_path_when_asked(monkeypatch):
    from pyro_rnp.cli import fast_path_enabled
    assert fast_path_enabled()
    monkeypatch.setenv("PYRO_RNP_FAST", "0")
    assert not fast_path_enabled()
