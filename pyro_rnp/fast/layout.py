"""How the fast path cuts the head's columns, and the buffers it recycles.

The head (hidden, numel) holds every generated layer side by side; layer ``name``
is the column block [offset, offset + rows * outputs). The fast path works on runs
of whole layers (``segments``, for the forward product) and on runs of whole rows
(``column_groups``, for the head's gradient); ``plan`` works both out once per layout.
"""
from __future__ import annotations

import functools

import torch

from ..model.hypernet import GeneratedLayer

GROUP_COLUMNS = 8192


def column_groups(layout: list[GeneratedLayer], limit: int | None = None) -> list[tuple[int, int]]:
    """The head's columns cut into runs of at most ``limit`` at layer or row boundaries (a row of a
    generated layer has ``outputs`` columns and is never cut).

    The deferred head gradient keeps each run's gradient rows in a buffer of its own,
    so the head's gradient comes out in results of (batch x limit) numbers, 2 MB at
    batch 64: small enough for glibc to serve warm from its heap (see process.py).
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

    The fast forward product writes each run's generated weights as a tensor of its
    own, straight from oneDNN: at batch 64, runs of at most 16 MB, under the 32 MB
    below which glibc keeps freed blocks for reuse (see process.py); one tensor for
    the whole head would be mapped afresh and page-faulted in on every step.
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
def plan(layout: tuple[GeneratedLayer, ...], limit: int, segment_limit: int):
    """(each layer's (layer, column offset), the column groups, each layer's pieces in them, the
    segments): worked out once per layout; every batch of programs of a step shares them."""
    layers, offset = {}, 0
    for layer in layout:
        layers[layer.name] = (layer, offset)
        offset += layer.numel
    groups = column_groups(list(layout), limit)
    return layers, groups, _pieces(layers, groups), segments(list(layout), segment_limit)


class BufferPool:
    """Reuses the large CPU buffers of generated programs and their gradients across steps.

    On CPU a fresh multi-megabyte allocation is page-faulted in on first touch, which
    can cost more than the matrix products that fill it; CUDA's caching allocator
    already reuses memory, so there ``take`` simply allocates. A tensor made under
    ``torch.inference_mode`` is never pooled: a step that records gradients cannot write it.
    """

    def __init__(self):
        self.free: dict[tuple, list[torch.Tensor]] = {}

    def take(self, shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A (possibly recycled) uninitialised tensor of ``shape`` on like's device, in ``dtype`` (like's
        by default)."""
        dtype = dtype or like.dtype
        if like.device.type != "cpu":
            return like.new_empty(shape, dtype=dtype)
        stack = self.free.get((tuple(shape), dtype))
        return stack.pop() if stack else like.new_empty(shape, dtype=dtype)

    def give(self, tensor: torch.Tensor) -> None:
        # a tensor made under torch.inference_mode cannot be written later by a step that records gradients
        if tensor.device.type == "cpu" and not tensor.is_inference():
            self.free.setdefault((tuple(tensor.shape), tensor.dtype), []).append(tensor)


POOL = BufferPool()
