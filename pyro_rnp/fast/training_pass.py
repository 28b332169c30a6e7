"""The deferred head gradient: one training step's program batches share one product for the head.

A step at depth 2 generates five batches of programs (the top level, then one per
step of the tree); each would form its own (hidden x numel) head gradient. Here
they write their gradient rows into shared buffers instead, and the head's gradient
is formed once when autograd finishes the backward pass.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import onednn
from .layout import POOL

if TYPE_CHECKING:
    from .programs import FastPrograms


class TrainingPass:
    """One training step's forward and backward pass on the fast path.

    While a ``FastProgramPath.training_pass()`` is open, the generated weights made in
    the forward pass recycle their memory after their backward, and the head's
    gradient goes straight into ``.grad``, past autograd's accumulation. On CPU,
    every program batch of the pass writes its weight gradient into rows of one
    shared buffer per column group, and the head's gradient is one product over all
    of them (inner size 320 at paper sizes instead of five products of 64), run when
    autograd finishes the backward pass; the forward products read a transposed copy
    of the head made once per pass (see onednn.py). Under CPU autocast the gradient rows
    and the head's products are in autocast's dtype, with the head converted once per pass.

    Use it only around a forward pass followed by exactly one backward whose
    gradients go to an optimizer, and do not change the head inside it: a second
    backward through the same graph would read recycled memory, and gradient hooks
    on the head (DDP's among them) do not fire.
    """

    def __init__(self):
        self.batches: list[FastPrograms] = []  # CPU batches of this forward pass, in order
        self.rows = 0
        self.slabs: list[torch.Tensor] | None = None  # per column group, (rows, columns): every batch's gradient
        self.head_t: torch.Tensor | None = None
        self.head_low: torch.Tensor | None = None  # the head in autocast's dtype, under CPU autocast

    def close(self) -> None:
        """Give back every buffer of the pass (called when the pass's context ends)."""
        self._reset()

    def register(self, programs: "FastPrograms", device: torch.device) -> bool:
        """Whether this batch's head gradient joins the pass's one product (CPU batches of one head)."""
        if device.type != "cpu" or (self.batches and self.batches[0].head is not programs.head):
            return False
        programs.row = self.rows
        self.rows += programs.n
        self.batches.append(programs)
        return True

    def transposed_head(self, head: torch.Tensor) -> torch.Tensor | None:
        """head.T, copied once per forward pass, when oneDNN runs this pass's forward products."""
        if not onednn.uses_onednn(head):
            return None
        if self.head_t is None:
            self.head_t = onednn.transpose_into(head, POOL.take(head.shape[::-1], head))
        return self.head_t

    def head_in(self, head: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The head in ``dtype``, converted once per pass (the head itself when it is in ``dtype``)."""
        if head.dtype == dtype:
            return head
        if self.head_low is None or self.head_low.dtype != dtype:
            self.head_low = POOL.take(head.shape, head, dtype)
            with torch.no_grad():
                self.head_low.copy_(head)
        return self.head_low

    def gradient_rows(self, programs: "FastPrograms", like: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        """This batch's rows of each column group's buffer (in ``dtype``); the first call of a backward
        pass queues the final product."""
        if self.slabs is None:
            self.slabs = [POOL.take((self.rows, stop - start), like, dtype) for start, stop in programs.groups]
            torch.autograd.Variable._execution_engine.queue_callback(self._flush)
        return [slab[programs.row:programs.row + programs.n] for slab in self.slabs]

    def _flush(self) -> None:
        """head.grad += H^T G over every batch whose backward ran (called when autograd finishes)."""
        done = [b for b in self.batches if b.deferred is not None]
        if done:
            head = done[0].head
            if head.grad is None:
                head.grad = torch.zeros_like(head)
            dtype = self.slabs[0].dtype
            every_h = torch.cat([b.deferred for b in done]).to(dtype) if len(done) == len(self.batches) else None
            for (start, stop), slab in zip(done[0].groups, self.slabs):
                target = head.grad[:, start:stop]
                if every_h is not None:
                    onednn.add_mm_tn(target, every_h, slab)
                else:  # part of the forward pass was not differentiated: its rows hold stale numbers
                    for b in done:
                        onednn.add_mm_tn(target, b.deferred.to(dtype), slab[b.row:b.row + b.n])
        self._reset()

    def _reset(self) -> None:
        for buffer in (self.slabs or []) + [self.head_t, self.head_low]:
            if buffer is not None:
                POOL.give(buffer)
        self.batches, self.rows, self.slabs, self.head_t, self.head_low = [], 0, None, None, None
