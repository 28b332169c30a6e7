"""One SVI training step (Trace_ELBO, Adam, gradient clamp), shared by the fit loop and the benchmark."""
from __future__ import annotations

import torch
from pyro.infer import Trace_ELBO

from .hypernet import fast_backward
from .model import RNP


def make_optimizer(rnp: RNP, lr: float) -> torch.optim.Optimizer:
    # the fused kernel does Adam's update in one pass over ~10M head weights instead of several
    return torch.optim.Adam(rnp.parameters(), lr=lr, fused=True)


class TrainStep:
    """Stochastic variational inference: one Trace_ELBO gradient step on a batch.

    The loss is -ELBO (plus the part-level regulariser) summed over the batch, as
    Pyro's plates define it. Gradients are clamped element-wise to +-grad_clip as
    the authors' code does. A non-finite loss skips the update and is reported.
    """

    def __init__(self, rnp: RNP, optimizer: torch.optim.Optimizer, grad_clip: float = 0.2,
                 warmup_steps: int = 0, base_lr: float | None = None):
        self.rnp = rnp
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.elbo = Trace_ELBO()
        self.warmup_steps = warmup_steps
        self.base_lr = base_lr if base_lr is not None else optimizer.param_groups[0]["lr"]
        self.params = [p for p in rnp.parameters() if p.requires_grad]

    def set_lr_for(self, step: int) -> None:
        """Linear warm-up over the first warmup_steps, then the base learning rate."""
        scale = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = self.base_lr * scale

    def __call__(self, x: torch.Tensor, step: int = 0) -> tuple[torch.Tensor, bool]:
        """Returns (loss summed over the batch, detached; whether the update was applied)."""
        self.rnp.train()
        self.set_lr_for(step)
        # zero in place: the head gradients are large, and fresh buffers cost page faults on CPU
        self.optimizer.zero_grad(set_to_none=False)
        with fast_backward():
            loss = self.elbo.differentiable_loss(self.rnp.model, self.rnp.guide, x)
            finite = bool(torch.isfinite(loss))
            if finite:
                loss.backward()
        if not finite:
            return loss.detach(), False
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_value_(self.params, self.grad_clip)
        self.optimizer.step()
        return loss.detach(), True
