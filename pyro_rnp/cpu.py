"""CPU speed: the hypernetwork head's products through oneDNN, and an allocator that keeps freed memory.

The head's products per batch of programs, h @ head and its two gradients
((64 x 64) times (64 x 133k) at paper sizes), were about half of a CPU training
step. On this project's 2-core AMD EPYC, float32 ``torch.mm`` (MKL) ran them at
110-130 GFLOP/s and oneDNN's matmul (the library behind PyTorch's CPU
convolutions) at 160-320 GFLOP/s, both in full float32. PyTorch reaches oneDNN's
float32 matmul only through ``torch.ops.mkldnn._linear_pointwise``, the op its
compiler emits for CPU linear layers, so these helpers call it where it is
present and agrees with ``torch.mm`` (checked once), and use ``torch.mm``
otherwise; ``PYRO_RNP_ONEDNN=0`` always uses ``torch.mm``. That op writes fresh
tensors, so wide results come in parts small enough for glibc to serve from its
heap (a fresh 34 MB result is page-faulted in, slower than the product itself here).

``keep_freed_memory`` is the other half: see its docstring.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch

_state: dict = {"onednn": None, "allocator": None}


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
    """out = b.T for a wide b (k, m), in column blocks that transpose within cache (1.6x faster
    than one strided copy of the head here)."""
    with torch.no_grad():
        for start in range(0, b.shape[1], 4096):
            out[start:start + 4096].copy_(b[:, start:start + 4096].t())
    return out


def add_mm_tn(target: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """target + a.T @ b (in place when target is given) for a tall a (r, k) and a wide b (r, m):
    the head's gradient from all program batches."""
    if not uses_onednn(a, b):
        return torch.mm(a.t(), b) if target is None else target.addmm_(a.t(), b)
    product = _linear(a.t().contiguous(), b.t())
    return product if target is None else target.add_(product)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEEP_BELOW = 32 << 20     # glibc's largest allowed mmap threshold on 64-bit
TRIM_ABOVE = 128 << 20


def keep_freed_memory() -> bool:
    """Let glibc keep freed blocks under 32 MB for reuse instead of returning them to the system.

    By default glibc maps each block above an adaptive threshold afresh and unmaps
    it when freed, and gives back a heap top above twice that. A training step
    frees and reallocates megabytes of activations (the encoder's first layer alone
    writes 4.7 MB tensors), so every step page-faulted them in again: about 4,000
    faults per step, 8 ms of the encoder's 33 ms (measured). With fixed thresholds
    faults fall to zero and peak memory stays the same (1.30 GB over 150 steps of
    the paper-size model). Only on Linux with glibc; ``PYRO_RNP_MALLOPT=0`` leaves
    the allocator alone. Process-wide, so called once by the training step on CPU.
    Returns whether the setting is in force.
    """
    if _state["allocator"] is None:
        _state["allocator"] = os.environ.get("PYRO_RNP_MALLOPT", "1") != "0" and _set_thresholds()
    return _state["allocator"]


def _set_thresholds() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not hasattr(libc, "gnu_get_libc_version"):  # musl and others have no such thresholds
            return False
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, KEEP_BELOW)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_ABOVE))
    except (OSError, AttributeError):
        return False
