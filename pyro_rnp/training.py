"""One SVI training step (Trace_ELBO, Adam, gradient clamp), shared by the fit loop and the benchmark."""
from __future__ import annotations

import atexit
import contextlib
import gc
import math

import torch
from pyro.infer import Trace_ELBO

from . import cpu
from .distributed import Context, ELBOLoss
from .hypernet import fast_backward
from .model import RNP

AMP_DTYPES = {"bf16": torch.bfloat16}


def make_optimizer(rnp: RNP, lr: float, head_lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """Adam; the hypernetwork's head may take smaller steps than the rest (``head_lr_scale``).

    Every generated weight sums the head over H's 64 trunk units, so one Adam step
    (about lr per head element) moves it by up to lr * sum|h|; at lr 3e-4 that
    diverged within 100-200 steps from some initialisations (measured), while
    the head at lr/8 and the rest at up to 1e-3 trained stably.
    """
    head = rnp.executor.hypernet.head if rnp.has_parts else None
    rest = [p for p in rnp.parameters() if p is not head and p.requires_grad]
    groups = [{"params": rest, "lr": lr, "base_lr": lr}]
    if head is not None and head.requires_grad:
        groups.append({"params": [head], "lr": lr * head_lr_scale, "base_lr": lr * head_lr_scale})
    # the fused kernel does Adam's update in one pass over ~10M head weights instead of several
    return torch.optim.Adam(groups, lr=lr, fused=True)


_PREPARED = [False]


def _prepare_process(on_cpu: bool) -> None:
    """Process-wide settings for training, made once, when the first TrainStep is built.

    - Python's cyclic collector: the objects alive now (torch's and Pyro's modules and
      the model, about 340k) move to its permanent generation (``gc.freeze``), so that
      a full collection no longer walks them all; those collections cost 12 ms per
      paper-size CPU step (4%, measured with gc.callbacks). Objects made later are
      collected as before; the frozen ones are handed back at exit for a clean shutdown.
    - On CPU, glibc keeps freed memory for the next step (``cpu.keep_freed_memory``).
    """
    if on_cpu:
        cpu.keep_freed_memory()
    if not _PREPARED[0]:
        _PREPARED[0] = True
        gc.freeze()
        atexit.register(gc.unfreeze)


class TrainStep:
    """Stochastic variational inference: one Trace_ELBO gradient step on a batch.

    The loss is -ELBO (plus the part-level regulariser) summed over the batch, as
    Pyro's plates define it. Gradients are clamped element-wise to +-grad_clip as
    the authors' code does. A non-finite loss skips the update and is reported.

    Under torch.distributed (``context.active``) the loss module is wrapped in
    DistributedDataParallel (see distributed.py). ``amp="bf16"`` runs the forward pass
    under autocast in bfloat16; the weights, gradients and Adam stay in float32.
    """

    def __init__(self, rnp: RNP, optimizer: torch.optim.Optimizer, grad_clip: float = 0.2,
                 warmup_steps: int = 0, schedule: str = "constant", total_steps: int | None = None,
                 frozen: tuple[torch.nn.Module, ...] = (), context: Context = Context(), amp: str | None = None):
        self.rnp = rnp
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.elbo = Trace_ELBO()
        self.context = context
        self.amp = amp
        self.loss = ELBOLoss(rnp, self.elbo, scale=context.world)
        if context.active:
            from torch.nn.parallel import DistributedDataParallel
            device = next(rnp.parameters()).device
            # a user's component may leave parameters unused (a point-mass guide ignores its scale head)
            self.loss = DistributedDataParallel(self.loss, device_ids=[device] if device.type == "cuda" else None,
                                                find_unused_parameters=True)
        self.warmup_steps = warmup_steps
        self.schedule = schedule
        self.frozen = frozen  # submodules kept in eval mode (their parameters are not trained)
        self.total_steps = total_steps
        self.params = [p for p in rnp.parameters() if p.requires_grad]
        self.buffers = list(rnp.buffers())
        _prepare_process(on_cpu=any(p.device.type == "cpu" for p in self.params))

    def lr_scale(self, step: int) -> float:
        """Linear warm-up over the first warmup_steps; then constant, or a cosine decay to 0 at total_steps."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "cosine" and self.total_steps:
            progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    def set_lr_for(self, step: int) -> None:
        scale = self.lr_scale(step)
        for group in self.optimizer.param_groups:
            group["lr"] = group.setdefault("base_lr", group["lr"]) * scale

    def __call__(self, x: torch.Tensor, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (loss summed over the batch, detached; whether the update was applied), both
        0-dim tensors on x's device: with the fused optimizer nothing here waits for the device."""
        self.rnp.train()
        for module in self.frozen:
            module.eval()
        self.set_lr_for(step)
        # zero in place: the head gradients are large, and fresh buffers cost page faults on CPU
        self.optimizer.zero_grad(set_to_none=False)
        # batch-norm statistics move during the forward pass: keep them to undo a step that is not applied
        buffers = [(b, b.clone()) for b in self.buffers]
        # the fast path adds the head's gradient in place, past DDP's hooks and autocast's dtypes
        fast = not self.context.active and self.amp is None
        autocast = (torch.autocast(x.device.type, dtype=AMP_DTYPES[self.amp]) if self.amp
                    else contextlib.nullcontext())
        with fast_backward() if fast else contextlib.nullcontext():
            try:
                with autocast:
                    loss = self.loss(x)
            except ValueError as e:  # with validation on, a distribution refused non-finite parameters
                if "invalid values" not in str(e):
                    raise
                loss = torch.tensor(float("nan"), device=x.device)
            finite = torch.isfinite(loss.detach())
            if self.context.active:  # one process's bad batch skips the step everywhere
                finite = _all_finite(finite)
            if not loss.requires_grad:
                return loss.detach(), self._undo(buffers, finite)
            # a non-finite loss still runs backward (no waiting to find out); its step is skipped below
            torch.where(finite, loss, torch.zeros_like(loss)).backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_value_(self.params, self.grad_clip)
        if self.optimizer.defaults.get("fused"):
            self.optimizer.found_inf = (~finite).float()  # the fused kernel skips the update on the device
            self.optimizer.step()
        elif bool(finite):
            self.optimizer.step()
        return loss.detach() / self.context.world, self._undo(buffers, finite)

    @staticmethod
    def _undo(buffers, finite: torch.Tensor) -> torch.Tensor:
        """Restore the batch-norm statistics of a skipped step; returns ``finite``."""
        for buffer, saved in buffers:
            buffer.copy_(torch.where(finite, buffer, saved))
        return finite


def _all_finite(finite: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist
    flag = finite.float()
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag.bool()


def state_finite(module: torch.nn.Module) -> bool:
    """Whether every parameter and floating-point buffer (batch-norm statistics) is finite."""
    tensors = [*module.parameters(), *(b for b in module.buffers() if b.is_floating_point())]
    return all(bool(torch.isfinite(t).all()) for t in tensors)
