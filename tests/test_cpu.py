"""The CPU products of the hypernetwork's head (oneDNN where it runs, torch.mm otherwise) and the fast
training path that uses them give the numbers plain autograd gives."""
import os
import platform
import subprocess
import sys

import pytest
import torch
from pyro.infer import Trace_ELBO

from conftest import tiny_config
from pyro_rnp import RNP, cpu
from pyro_rnp import hypernet
from pyro_rnp.hypernet import (GeneratedLayer, GeneratedPrograms, HyperNetwork, column_groups, fast_backward,
                               segments)


@pytest.fixture(params=["onednn", "torch.mm"])
def backend(request, monkeypatch):
    if request.param == "onednn" and not cpu.onednn_available():
        pytest.skip("oneDNN's matmul is not available in this PyTorch build")
    monkeypatch.setitem(cpu._state, "onednn", request.param == "onednn")
    return request.param


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
    assert all(stop - start <= max(limit or hypernet.SEGMENT_COLUMNS, biggest) for start, stop in runs)
    if limit == 100:  # every layer of the paper's sizes is bigger: one segment each
        assert len(runs) == len(layout)


def test_column_groups_cut_the_head_at_row_boundaries():
    layout = HyperNetwork(32).layout
    groups = column_groups(layout)
    assert groups[0][0] == 0 and groups[-1][1] == sum(layer.numel for layer in layout)
    assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
    assert max(stop - start for start, stop in groups) <= hypernet.GROUP_COLUMNS
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
    monkeypatch.setattr(hypernet, "GROUP_COLUMNS", group_columns)
    monkeypatch.setattr(hypernet, "SEGMENT_COLUMNS", group_columns)
    torch.manual_seed(0)
    rnp = RNP(tiny_config(depth=2, steps=3))
    layout = rnp.executor.hypernet.layout
    if group_columns == 50:
        assert len(column_groups(layout)) > len(layout)  # some layers span several groups
    x = fashion_images[:6]
    grads = []
    for fast in (False, True):
        rnp.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same reparameterised sample of z
        with fast_backward() if fast else torch.enable_grad():
            Trace_ELBO().differentiable_loss(rnp.model, rnp.guide, x).backward()
        grads.append({name: p.grad.clone() for name, p in rnp.named_parameters()})
    plain, fast = grads
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
        with fast_backward() if fast else torch.enable_grad():
            batches = [GeneratedPrograms(h, head, layout) for h in hs]
            used = batches[1] if unused_first else batches[0]
            used.apply("a", x).square().sum().backward()
        return head.grad

    for unused_first in (True, False):
        assert torch.allclose(run(False, unused_first), run(True, unused_first), atol=1e-5)


_MAPPED = """
import ctypes, torch
from pyro_rnp import cpu
on = cpu.keep_freed_memory()
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
