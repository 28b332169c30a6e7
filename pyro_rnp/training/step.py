"""One SVI training step (the model's ELBO, Adam, gradient clamp), shared by the training loop and
the benchmark."""
from __future__ import annotations

import contextlib
import math

import pyro
import torch
import torch.nn as nn
from pyro.infer import Trace_ELBO, TraceGraph_ELBO
from pyro.distributions.util import is_identically_zero

from .. import fast as fast_path
from ..model.hypernet import HyperNetwork
from .distributed import Context, ELBOLoss

AMP_DTYPES = {"bf16": torch.bfloat16}


def mixed_precision(amp: str | None, device: torch.device):
    """The context a forward pass runs in for ``amp`` (None: float32; "bf16": autocast in bfloat16 on
    ``device``). Parameters stay float32; the model keeps float32 where bfloat16 would hurt
    (pyro_rnp/model/precision.py)."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


class TraceELBOOnDevice(Trace_ELBO):
    """Trace_ELBO's differentiable loss, computed without reading any value back to the host.

    Pyro's version sums every site's log-probability as a Python float and checks the loss
    for NaN, each a wait for the device. For guides whose sites are all reparameterized
    this returns the same loss (to float rounding) with the same gradient, as a tensor on
    the device; a particle with a score-function term is left to Pyro's computation.
    """

    def differentiable_loss(self, model, guide, *args, **kwargs):
        loss = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            loss = loss + self._particle_loss(model_trace, guide_trace) / self.num_particles
        return loss

    def _particle_loss(self, model_trace, guide_trace):
        elbo = 0.0
        for site in model_trace.nodes.values():
            if site["type"] == "sample":
                elbo = elbo + site["log_prob_sum"]
        for site in guide_trace.nodes.values():
            if site["type"] == "sample":
                _, score_function_term, entropy_term = site["score_parts"]
                if not is_identically_zero(score_function_term):
                    loss, surrogate = self._differentiable_loss_particle(model_trace, guide_trace)
                    return loss + (surrogate - surrogate.detach())
                if not is_identically_zero(entropy_term):
                    elbo = elbo - entropy_term.sum()
        return -elbo


class TraceGraphELBOLoss(TraceGraph_ELBO):
    """TraceGraph_ELBO as a differentiable loss: its value is -ELBO, its gradient that of Pyro's
    surrogate loss (score-function terms with their downstream costs and baselines, plus the
    baselines' squared error), as ``TraceGraph_ELBO.loss_and_grads`` would back-propagate."""

    def differentiable_loss(self, model, guide, *args, **kwargs):
        elbo, surrogate = self._loss_and_surrogate_loss(model, guide, args, kwargs)
        return -elbo + (surrogate - surrogate.detach())


ELBOS = {"trace_elbo": TraceELBOOnDevice, "tracegraph_elbo": TraceGraphELBOLoss}


def make_optimizer(model: nn.Module, lr: float, head_lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """Adam; the hypernetworks' heads may take smaller steps than the rest (``head_lr_scale``), and a
    model with an ``optimizer_groups(lr)`` method (AIR: its baselines) sets its own groups.

    Every generated weight sums the head over H's trunk units, so one Adam step (about
    lr per head element) moves it by up to lr * sum|h|: the head diverges at learning
    rates the rest of the model takes in its stride (the quick preset's choice is in config.py).
    """
    if hasattr(model, "optimizer_groups"):
        return torch.optim.Adam(model.optimizer_groups(lr), lr=lr, fused=True)
    heads = [m.head for m in model.modules() if isinstance(m, HyperNetwork)]
    rest = [p for p in model.parameters() if all(p is not head for head in heads) and p.requires_grad]
    groups = [{"params": rest, "lr": lr, "base_lr": lr}]
    trained_heads = [head for head in heads if head.requires_grad]
    if trained_heads:
        groups.append({"params": trained_heads, "lr": lr * head_lr_scale, "base_lr": lr * head_lr_scale})
    # the fused kernel does Adam's update in one pass over the head's millions of weights
    return torch.optim.Adam(groups, lr=lr, fused=True)


class LearningRateSchedule:
    """The learning rate of step ``step``: a linear warm-up over ``warmup_steps``, then constant or a cosine
    decay to 0 at ``total_steps``; ``set_lr_for`` applies it to every group's ``base_lr``."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 0, schedule: str = "constant",
                 total_steps: int | None = None):
        self.optimizer, self.warmup_steps, self.schedule, self.total_steps = (
            optimizer, warmup_steps, schedule, total_steps)

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


class TrainStep(LearningRateSchedule):
    """Stochastic variational inference: one gradient step of the model's ELBO on a batch.

    The loss is -ELBO (plus the RNP's part-level regulariser) summed over the batch, as
    Pyro's plates define it, with the ELBO the model's ``objective`` names (Trace_ELBO or
    TraceGraph_ELBO). Gradients are clamped element-wise to +-grad_clip as the authors'
    code does. A non-finite loss skips the update and is reported.

    ``fast=True`` puts the fast path on the model's hypernetworks (``pyro_rnp.fast.accelerate``)
    and opens a ``TrainingPass`` around each single-process float32 step; ``fast=False``
    trains on the plain path. Under torch.distributed (``context.active``) the loss module
    is wrapped in DistributedDataParallel (see distributed.py). ``amp="bf16"`` runs the
    forward pass under autocast in bfloat16; the weights, gradients and Adam stay in float32.
    Building a TrainStep changes nothing outside the model: process-wide settings are the
    entry point's (``pyro_rnp.fast.prepare_process_for_training``).
    """

    def __init__(self, rnp: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float = 0.2,
                 warmup_steps: int = 0, schedule: str = "constant", total_steps: int | None = None,
                 frozen: tuple[torch.nn.Module, ...] = (), context: Context = Context(), amp: str | None = None,
                 fast: bool = True):
        super().__init__(optimizer, warmup_steps, schedule, total_steps)
        self.rnp = rnp
        self.grad_clip = grad_clip
        objective = getattr(rnp, "objective", "trace_elbo")
        if objective not in ELBOS:
            raise ValueError(f"TrainStep trains by an ELBO ({', '.join(ELBOS)}); the model's objective is "
                             f"{objective!r}")
        self.elbo = ELBOS[objective]()
        self.program_path = fast_path.program_path(fast_path.accelerate(rnp)) if fast else None
        self.context = context
        self.amp = amp
        self.loss = ELBOLoss(rnp, self.elbo, scale=context.world)
        if context.active:
            from torch.nn.parallel import DistributedDataParallel
            device = next(rnp.parameters()).device
            # a user's component may leave parameters unused (a point-mass guide ignores its scale head)
            self.loss = DistributedDataParallel(self.loss, device_ids=[device] if device.type == "cuda" else None,
                                                find_unused_parameters=True)
        self.frozen = frozen  # submodules kept in eval mode (their parameters are not trained)
        self.params = [p for p in rnp.parameters() if p.requires_grad]
        # the buffers a forward pass moves (batch-norm statistics), kept to undo a step that is not applied
        self.buffers = [b for m in rnp.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                        for b in m.buffers()]

    def __call__(self, x: torch.Tensor, step: int = 0, index: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (loss summed over the batch, detached; whether the update was applied), both
        0-dim tensors on x's device: with the fused optimizer and validation off (as on CUDA),
        nothing here waits for the device. ``index`` (the images' rows in the training set) is
        not needed: the guide is amortized."""
        self.rnp.train()
        for module in self.frozen:
            module.eval()
        self.set_lr_for(step)
        # zero in place: the head gradients are large, and fresh buffers cost page faults on CPU
        self.optimizer.zero_grad(set_to_none=False)
        # batch-norm statistics move during the forward pass: keep them to undo a step that is not applied
        buffers = [(b, b.clone()) for b in self.buffers]
        # the training pass adds the head's gradient in place, past DDP's hooks (and, on CUDA, autocast's
        # dtypes); under CPU autocast it forms the head's products in bfloat16 (pyro_rnp/fast/programs.py)
        deferred = (self.program_path is not None and not self.context.active
                    and (self.amp is None or x.device.type == "cpu"))
        autocast = mixed_precision(self.amp, x.device)
        checks = contextlib.nullcontext() if validates_inside(x.device, self.context) else \
            pyro.validation_enabled(False)
        with self.program_path.training_pass() if deferred else contextlib.nullcontext():
            try:
                with autocast, checks:
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


def validates_inside(device: torch.device, context: Context) -> bool:
    """Whether a training step keeps Pyro's validation on (as the global setting says): on CPU in one
    process. Validation checks every distribution with a host wait, and under DDP a refusal on one
    process alone would leave the others waiting in the all-reduce; on CUDA and across processes,
    non-finite values are caught by the step's finiteness flag instead, the same on every process."""
    return device.type != "cuda" and not context.active


def _all_finite(finite: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist
    flag = finite.float()
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag.bool()


def state_finite(module: torch.nn.Module) -> bool:
    """Whether every parameter and floating-point buffer (batch-norm statistics) is finite."""
    tensors = [*module.parameters(), *(b for b in module.buffers() if b.is_floating_point())]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class AlternatingBackpropStep(LearningRateSchedule):
    """Alternating back-propagation (the sparse AND-OR generator's Algorithm 1, without its critic): for a
    batch x with rows ``index`` of the training set, ``langevin_steps`` Langevin updates of those images'
    persistent latents on log p(z, x) (the model's ``langevin``), stored back; then one optimizer step of
    the generator on -log p(z, x) summed over the batch, at the updated latents.

    With the model's energy-based critic E (config ``andor_critic``), the same step also draws images
    g(z') from fresh z' ~ N(0, I) and gives E the gradient of
        mean E(x) - mean E(g(z')) + critic_regulariser * (mean E(x)^2 + mean E(g(z'))^2)
    (observed images to lower energy than generated ones; the squares keep the energies bounded), and g
    the gradient of -log p(z, x) + critic_weight * E(g(z')), summed over the batch: one optimizer step
    updates both, each on its own loss.

    The loss returned is -log p(z, x) (nats per batch, not an ELBO). A non-finite loss skips the
    update and keeps the latents as they were. Gradients are clamped element-wise to +-grad_clip
    when it is positive."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, training_images: int,
                 grad_clip: float = 0.0, warmup_steps: int = 0, schedule: str = "constant",
                 total_steps: int | None = None, context: Context = Context()):
        super().__init__(optimizer, warmup_steps, schedule, total_steps)
        if context.active:
            raise ValueError("alternating back-propagation keeps one latent per training image in one process; "
                             "train it without torchrun")
        self.rnp, self.grad_clip, self.context = model, grad_clip, context
        self.params = [p for p in model.parameters() if p.requires_grad]
        model.ensure_train_latents(training_images)

    def __call__(self, x: torch.Tensor, step: int = 0, index: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if index is None:
            raise ValueError("alternating back-propagation needs the images' rows in the training set (index)")
        model = self.rnp
        model.train()
        self.set_lr_for(step)
        index = index.to(model.train_latents.device)
        z = model.langevin(model.train_latents[index], x, model.config.langevin_steps)
        self.optimizer.zero_grad(set_to_none=False)
        loss = -model.log_joint(z, x).sum()
        finite = torch.isfinite(loss.detach()) & torch.isfinite(z).all()
        generator_loss = loss
        if model.critic is not None:
            c = model.config
            generated = model.generator(torch.randn_like(z))
            observed_energy, generated_energy = model.critic(x), model.critic(generated.detach())
            critic_loss = (observed_energy.mean() - generated_energy.mean()
                           + c.critic_regulariser * (observed_energy.pow(2).mean() + generated_energy.pow(2).mean()))
            critic_loss.backward(inputs=list(model.critic.parameters()))
            generator_loss = loss + c.critic_weight * model.critic(generated).sum()
            finite = finite & torch.isfinite(critic_loss.detach())
        # each network takes the gradient of its own loss only
        torch.where(finite, generator_loss, torch.zeros_like(generator_loss)).backward(
            inputs=list(model.generator.parameters()))
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_value_(self.params, self.grad_clip)
        if bool(finite):
            self.optimizer.step()
            model.train_latents[index] = z
        return loss.detach(), finite

