"""Process-wide settings for training, for the entry point that owns the process.

Nothing in the package calls these as a side effect: the commands (fit, transfer,
bench) call ``prepare_process_for_training`` once, before their first step. In your
own script or notebook, call it yourself if you want the same speed:

    from pyro_rnp.fast import prepare_process_for_training
    prepare_process_for_training()

What it changes, for the whole process:
- Python's cyclic collector: the objects alive now (torch's, Pyro's and the model's,
  hundreds of thousands) move to its permanent generation (``gc.freeze``), so that a
  full collection no longer walks them all; objects made later are collected as
  before, and the frozen ones are handed back at exit for a clean shutdown.
- On CPU with glibc, freed blocks under 32 MB stay in the heap for the next step
  (``keep_freed_memory``; ``PYRO_RNP_MALLOPT=0`` leaves the allocator alone).
"""
from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import gc
import os
import sys

_state: dict = {"allocator": None, "frozen": False}


def prepare_process_for_training(cpu: bool = True) -> None:
    """Freeze the objects alive now out of full garbage collections (once per process) and, when
    ``cpu``, keep freed memory in glibc's heap."""
    if cpu:
        keep_freed_memory()
    if not _state["frozen"]:
        _state["frozen"] = True
        gc.freeze()
        atexit.register(gc.unfreeze)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEEP_BELOW = 32 << 20     # glibc's largest allowed mmap threshold on 64-bit
TRIM_ABOVE = 128 << 20


def keep_freed_memory() -> bool:
    """Let glibc keep freed blocks under 32 MB for reuse instead of returning them to the system.

    By default glibc maps each block above an adaptive threshold afresh and unmaps it
    when freed, and gives back a heap top above twice that. A training step frees and
    reallocates megabytes of activations (the encoder's first layer alone writes 4.7 MB
    tensors), so without this every step page-faults them in again. Only on Linux with
    glibc; ``PYRO_RNP_MALLOPT=0`` leaves the allocator alone. Returns whether the
    setting is in force.
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
