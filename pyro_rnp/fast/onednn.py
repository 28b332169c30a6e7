"""The hypernetwork head's products on CPU through oneDNN, with torch.mm as the fallback.

The head's products per batch of programs, h @ head and its two gradients ((64 x
64) times (64 x 133k) at paper sizes), are a large share of a CPU training step,
and oneDNN's float32 matmul (the library behind PyTorch's CPU convolutions) runs
them faster than ``torch.mm`` on some CPUs (the numbers are in the README's
performance section). PyTorch reaches oneDNN's float32 matmul only through the
private op ``torch.ops.mkldnn._linear_pointwise``, the op its compiler emits for
CPU linear layers, so these helpers call it where it is present and agrees with
``torch.mm`` (checked once), and use ``torch.mm`` otherwise; ``PYRO_RNP_ONEDNN=0``
always uses ``torch.mm``. That op writes fresh tensors, so callers ask for wide
results in parts small enough for glibc to serve from its heap (see process.py).
"""
from __future__ import annotations

import os

import torch

_state: dict = {"onednn": None}


def onednn_available() -> bool:
    """Whether oneDNN's float32 matmul can be called here (checked once, against torch.mm)."""
    if _state["onednn"] is None:
        _state["onednn"] = os.environ.get("PYRO_RNP_ONEDNN", "1") != "0" and _onednn_works()
    return _state["onednn"]


def _onednn_works() -> bool:
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(5, 7, generator=generator)
        w = torch.randn(7, 3, generator=generator)
        y = _linear(x, w.t())
        return y.shape == (5, 3) and torch.allclose(y, x @ w, rtol=1e-5, atol=1e-5)
    except (AttributeError, RuntimeError):
        return False


def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T in oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def uses_onednn(*tensors: torch.Tensor) -> bool:
    """Whether products of these tensors run in oneDNN: float32 on CPU, outside autocast."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not torch.is_autocast_enabled("cpu") and onednn_available())


def mm_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T, a fresh tensor, for a (n, m) and b (k, m); b is copied first if it is not contiguous."""
    if not uses_onednn(a, b):
        return torch.mm(a, b.t())
    return _linear(a.contiguous(), b.contiguous())


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for a (n, m) and a contiguous b (m, k) with a small result (n, k)."""
    if not uses_onednn(a, b):
        return torch.mm(a, b)
    return _linear(a.contiguous(), b.t())


def transpose_into(b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = b.T for a wide b (k, m), in column blocks that transpose within the cache (one strided
    copy of the whole head is slower)."""
    with torch.no_grad():
        for start in range(0, b.shape[1], 4096):
            out[start:start + 4096].copy_(b[:, start:start + 4096].t())
    return out


def add_mm_tn(target: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """target + a.T @ b (in place when target is given) for a tall a (r, k) and a wide b (r, m):
    the head's gradient from all program batches. a and b may be in a lower precision than target
    (CPU autocast): the product is formed in theirs and added in target's."""
    if target is not None and target.dtype != b.dtype:
        return target.add_(torch.mm(a.t(), b))
    if not uses_onednn(a, b):
        return torch.mm(a.t(), b) if target is None else target.addmm_(a.t(), b)
    product = _linear(a.t().contiguous(), b.t())
    return product if target is None else target.add_(product)


def cpu_computes_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (avx512_bf16 or AMX), as oneDNN reports it through
    the private ``torch.ops.mkldnn._is_mkldnn_bf16_supported`` (False where this torch lacks it).
    ``PYRO_RNP_CPU_BF16=0`` treats the CPU as one without (to see what such a machine is told)."""
    if os.environ.get("PYRO_RNP_CPU_BF16", "1") == "0":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
